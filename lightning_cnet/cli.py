"""The ``lightning-cnet`` command line: a LightningCLI for LightningModules that hold a ContinuousNet.

``lightning-cnet {fit,validate,test,predict} [--config FILE.yaml] [--key value ...]``; with no config it trains
:class:`~lightning_cnet.module.ContinuousNetClassifier` on :class:`~lightning_cnet.data.DigitsDataModule`.
The model and the data are chosen by ``class_path`` (any ``LightningModule``, e.g.
:class:`~lightning_cnet.module.ContinuousNetSegmenter` or a user's own, and any ``LightningDataModule``), callbacks
come from the YAML, a model's ``num_classes`` and ``in_chans`` (where it takes them) are taken from the data,
checkpoints of the last and the best epoch are kept (the best by the model's ``monitor`` and ``mode`` class
attributes: ``val_acc`` for the classifier, ``val_iou`` for the segmenter; ``checkpoint.monitor`` sets another), and
the resolved config is saved as ``config.yaml`` in the run's log directory.

Mistakes in the input (an unknown key or model, a ``num_classes`` that does not match the data, a checkpoint of
another model, a missing dataset) end with one line ``lightning-cnet: error: ...`` on stderr, exit status 2, and
no files left from the failed run.

``lightning-cnet predict`` with a classifier writes ``predictions.csv`` (sample index, predicted class, class
probabilities) to the run's log directory and names it in its last log line; ``lightning-cnet --version`` prints the
version; ``--optimizer`` without ``--lr_scheduler`` warns, in one line, that the model's own optimizer and schedule are
replaced by a constant learning rate.

Example:
    >>> main(["fit", "--config", "configs/digits.yaml", "--trainer.max_epochs", "1"])  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import csv
import errno
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import yaml
from lightning_fabric.utilities.exceptions import MisconfigurationException  # pytorch_lightning's, defined here
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeUnion
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.optim import Optimizer

from lightning_cnet import __version__
from lightning_cnet._atomic import os_error_in
from lightning_cnet._cli_common import UsageError, error_line, exception_chain, load_checkpoint_file, one_line
from lightning_cnet._parser_messages import condense
from lightning_cnet._run_folders import (
    Claim,
    checkpoint_folder,
    claim,
    refuse_used_checkpoint_folders,
    remove_unfinished,
    run_folders,
    shown,
)
from lightning_cnet._validation import TRAINER_RANGES, check_ranges
from lightning_cnet.callbacks import refinable_modules
from lightning_cnet.checkpoint_io import AtomicCheckpointIO
from lightning_cnet.classification import ClassificationTask
from lightning_cnet.cost import check_cost, estimate_cost, training_batch_shape
from lightning_cnet.data import DatasetNotFoundError
from lightning_cnet.latest_run import LatestRunLink
from lightning_cnet.models import ContinuousNet
from lightning_cnet.progress_bar import CompactRichProgressBar, CompactTQDMProgressBar
from lightning_cnet.resolution import StageResolution

PROG = "lightning-cnet"
DEFAULT_MODEL = "lightning_cnet.module.ContinuousNetClassifier"
DEFAULT_DATA = "lightning_cnet.data.DigitsDataModule"
#: Model arguments that are taken from the data module (``data.X`` is linked to ``model.init_args.X``).
LINKED_FROM_DATA = ("num_classes", "in_chans")
#: Model options compared with a loaded checkpoint (``n_steps`` only when given on the command line: a config's
#: ``n_steps`` is where training starts, before refinement); ``scheme`` and ``n_steps`` also inside ``model_kwargs``.
MANIFESTATION_OPTIONS = ("model", "scheme", "n_steps")


class Interrupted(Exception):
    """The run was stopped by a signal after its checkpoints were made safe; reported as one line.

    Attributes:
        status: the exit status (``128 + signal number``: 143 for SIGTERM).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Parser(LightningArgumentParser):
    """A LightningArgumentParser whose errors raise :class:`UsageError` with a one-line message (argparse's ``error``
    hook, with jsonargparse's exception; see :mod:`lightning_cnet._parser_messages`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` must not pass for `max_epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # jsonargparse names the parser of a subcommand whose option was not accepted on the exception
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UsageError(condense(message, parser, ex)) from ex


class PredictionCSVWriter(BasePredictionWriter):
    """Write the class probabilities of ``predict`` to a CSV file, one row per sample, batch by batch.

    Columns: ``index`` (the sample's index in the predict dataset), ``predicted`` (the most probable class) and
    ``prob_0`` ... ``prob_<C-1>``. The file is ``predictions.csv`` in ``output_dir`` (default: the Trainer's
    ``log_dir``, the run directory); with several predict dataloaders or processes each gets its own file
    (``predictions_dataloader<d>_rank<r>.csv``). The path is logged when prediction ends.

    Args:
        output_dir: where to write (default: ``trainer.log_dir``, else the working directory).

    Example:
        >>> trainer = pl.Trainer(callbacks=[PredictionCSVWriter("outputs")])  # doctest: +SKIP
        >>> trainer.predict(model, datamodule=data, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.paths: list[Path] = []
        self._writers: dict[int, tuple[Any, Any]] = {}
        self._rows: dict[int, int] = {}

    def _path(self, trainer: pl.Trainer, dataloader_idx: int) -> Path:
        directory = self.output_dir or Path(trainer.log_dir or ".")
        suffix = f"_dataloader{dataloader_idx}" if len(trainer.num_predict_batches) > 1 else ""
        suffix += f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return directory / f"predictions{suffix}.csv"

    def write_on_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        probabilities = prediction.detach().float().cpu()
        if probabilities.dim() != 2:
            raise ValueError(f"{type(self).__name__} expects class probabilities [batch, classes] from predict_step, "
                             f"got a tensor of shape {list(probabilities.shape)}")
        if dataloader_idx not in self._writers:
            path = self._path(trainer, dataloader_idx)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = path.open("w", newline="")
            writer = csv.writer(handle)
            writer.writerow(["index", "predicted", *(f"prob_{c}" for c in range(probabilities.shape[1]))])
            self._writers[dataloader_idx] = (handle, writer)
            self._rows[dataloader_idx] = 0
            self.paths.append(path)
        _, writer = self._writers[dataloader_idx]
        start = self._rows[dataloader_idx]
        indices = list(batch_indices) if batch_indices else range(start, start + len(probabilities))
        for index, row in zip(indices, probabilities.tolist()):
            writer.writerow([index, max(range(len(row)), key=row.__getitem__), *(f"{p:.6g}" for p in row)])
        self._rows[dataloader_idx] = start + len(probabilities)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle, _ in self._writers.values():
            handle.close()
        self._writers = {}
        for dataloader_idx, path in enumerate(self.paths):
            rank_zero_info(f"Predictions of {self._rows[dataloader_idx]} samples written to {path}")


class ContinuousNetCLI(LightningCLI):
    """LightningCLI with the project's defaults: digits data, checkpoints, links from the data to the model.

    Everything it adds goes through LightningCLI's public hooks: ``parse_arguments`` checks a ``--ckpt_path`` file and
    what the options ask of it, ``before_instantiate_classes`` checks the Trainer's values, ``instantiate_classes``
    and ``after_instantiate_classes`` say what replacing the model's optimizer costs, ``configure_optimizers`` lets
    ``--optimizer`` train the parameters a checkpoint gave the model, ``instantiate_trainer`` adds the run's callbacks
    (through ``trainer_defaults``) and atomic checkpoints, ``before_<subcommand>`` claims the run's folders, and
    ``__init__`` releases them and cleans up after bad input.

    Args:
        args: command line arguments (default: ``sys.argv[1:]``).
        **kwargs: any other :class:`~pytorch_lightning.cli.LightningCLI` argument.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", default_trainer_settings())
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        # Runs with a logger save config.yaml in their own version directory; without one it goes to the
        # working directory, where the previous run's copy is replaced rather than aborting the new run.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        arguments = list(sys.argv[1:] if args is None else args)
        self._explicit_links = explicit_linked_arguments(arguments)
        self._explicit_model_options = explicit_model_options(arguments, MANIFESTATION_OPTIONS)
        self._command_line_model_options = explicit_model_options(arguments, MANIFESTATION_OPTIONS, configs=False)
        self._requested_manifestation: dict[str, Any] = {}
        defaults = kwargs["trainer_defaults"].get("callbacks") or []
        self._default_callbacks = list(defaults) if isinstance(defaults, list) else [defaults]
        self._claim: Claim | None = None
        try:
            super().__init__(
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                parser_class=_Parser,
                args=None if args is None else list(args),
                **kwargs,
            )
        except SIGTERMException:
            raise Interrupted(_stopped_by_signal(self.trainer, "SIGTERM"), 128 + signal.SIGTERM) from None
        except BaseException as err:
            if self._claim is not None and is_user_error(err):
                remove_unfinished(self._claim.created, self._claim.folders)
            raise
        finally:
            if self._claim is not None:
                self._claim.release()

    # ------------------------------------------------------------------ parsing
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser with ``--version``."""
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})
        for name in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.mode": None})  # not given: the model's own (see checkpoint_defaults)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check the ``--ckpt_path`` file and the explicit model options against it, before LightningCLI
        reads the checkpoint's hyperparameters into the config (which would silently replace the explicit options)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path:
            stored = read_checkpoint(path)
            self._requested_manifestation = requested_manifestation(
                subcommand, stored, self._explicit_model_options, self._command_line_model_options
            )

    # ------------------------------------------------------------------ building
    def before_instantiate_classes(self) -> None:
        """Check the Trainer values that Lightning accepts when it is built but fails on during the run (a negative
        ``min_epochs``, ``accumulate_grad_batches=0``, ...), before anything is built or written; fill the
        checkpoint's monitor from the model class (see :func:`checkpoint_defaults`)."""
        config = _section(self.config, self.subcommand)
        try:
            check_ranges(TRAINER_RANGES, dict((config.get("trainer") or {}).items()), prefix="trainer.")
        except ValueError as error:
            raise UsageError(str(error)) from None
        checkpoint_defaults(config)

    def instantiate_classes(self) -> None:
        """LightningCLI's, without its warning that ``--optimizer`` replaces the model's ``configure_optimizers`` when
        no ``--lr_scheduler`` is given: :meth:`after_instantiate_classes` says it in one line, with what is lost."""
        with warnings.catch_warnings():
            if self._constant_rate():
                warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by")
            super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        """Reject a ``num_classes``/``in_chans`` given for the model that differs from the data's; warn when
        ``--optimizer`` without ``--lr_scheduler`` replaces the model's optimizer and schedule."""
        for name, value in self._explicit_links.items():
            data_value = getattr(self.datamodule, name, None)
            if data_value is not None and value != data_value:
                raise UsageError(
                    f"model {name}={value} does not match {type(self.datamodule).__name__}, which has "
                    f"{name}={data_value}; remove model.init_args.{name} (it is taken from the data)"
                )
        if self._constant_rate():
            _warn_constant_rate(self.model)

    def _constant_rate(self) -> bool:
        """Whether ``--optimizer`` is given without ``--lr_scheduler``."""
        config = _section(self.config, self.subcommand)
        return bool(config.get("optimizer")) and not config.get("lr_scheduler")

    @staticmethod
    def configure_optimizers(
        lightning_module: pl.LightningModule, optimizer: Optimizer, lr_scheduler: LRSchedulerTypeUnion | None = None
    ) -> Any:
        """LightningCLI's, on the parameters the model has when the Trainer asks for its optimizers.

        LightningCLI builds ``--optimizer`` at parse time from the model's parameters; a checkpoint loaded since may
        have refined the ODE stages to a finer resolution, with new parameters. An optimizer that has not stepped and
        holds one param group is pointed at the model's current parameters."""
        if not optimizer.state and len(optimizer.param_groups) == 1:
            optimizer.param_groups[0]["params"] = list(lightning_module.parameters())
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """LightningCLI's Trainer with the run's callbacks (:meth:`_run_callbacks`), Lightning's refusals of its
        arguments as one line, and atomic checkpoint writes when ``plugins`` chose no checkpoint writer."""
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": [*self._default_callbacks,
                                                                         *self._run_callbacks()]}
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as error:  # Lightning's checks of the Trainer's arguments
            raise UsageError(f"trainer: {one_line(error)}") from None
        plugins = _section(self.config_init, self.subcommand).get("trainer", {}).get("plugins") or []
        chosen = any(isinstance(p, CheckpointIO) for p in (plugins if isinstance(plugins, list) else [plugins]))
        if not chosen and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # plugins given without one
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_callbacks(self) -> list[Callback]:
        """The callbacks a run gets besides the configured ones: ``last.ckpt`` beside the best checkpoint, the requested
        manifestation of a loaded checkpoint, the compact progress bar (:mod:`lightning_cnet.progress_bar`, rich when
        ``rich`` is installed) when no other progress bar is configured, the ``latest`` link to the run for ``fit``,
        and the CSV prediction writer for ``predict`` when no prediction writer is configured."""
        config = _section(self.config_init, self.subcommand)
        trainer = config.get("trainer") or {}
        best = config.get("checkpoint")
        configured = [*(trainer.get("callbacks") or []), *([best] if best is not None else [])]
        callbacks: list[Callback] = []
        if isinstance(best, ModelCheckpoint):
            callbacks.append(last_checkpoint(best.dirpath))
        if self._requested_manifestation:
            callbacks.append(RequestedManifestation(**self._requested_manifestation))
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(cb, ProgressBar)
                                                                         for cb in configured):
            callbacks.append(CompactRichProgressBar() if find_spec("rich") else CompactTQDMProgressBar())
        if self.subcommand == "fit":
            callbacks.append(LatestRunLink())
        if isinstance(trainer.get("logger"), CSVLogger) and find_spec("tensorboard") is None:
            _note_csv_logging()
        if (self.subcommand == "predict" and isinstance(self.model, ClassificationTask)
                and not any(isinstance(cb, BasePredictionWriter) for cb in configured)):
            callbacks.append(PredictionCSVWriter())
        return callbacks

    # ------------------------------------------------------------------ running
    def before_fit(self) -> None:
        self._start_run("fit")

    def before_validate(self) -> None:
        self._start_run("validate")

    def before_test(self) -> None:
        self._start_run("test")

    def before_predict(self) -> None:
        self._start_run("predict")

    def _start_run(self, subcommand: str) -> None:
        """Check the run's cost, then claim its folders: those this run creates are its own (removed again, unless
        they hold a checkpoint, when it fails on bad input), all are locked against a second run, and a fit into a
        folder that already holds checkpoints must resume (``--ckpt_path``). ``__init__`` releases them."""
        self._check_cost(subcommand)
        folders = run_folders(self.trainer, fit=subcommand == "fit")
        rank = getattr(rank_zero_only, "rank", 0)  # set by Lightning at import, from the environment
        self._claim = claim(folders) if rank == 0 else Claim([], [], [])
        if subcommand == "fit":
            refuse_used_checkpoint_folders(self.trainer, self.config[subcommand].get("ckpt_path"))

    def _check_cost(self, subcommand: str) -> None:
        """Estimate what the run costs before it starts (:mod:`lightning_cnet.cost`): ``fit`` trains the model at its
        step count (weights, gradients, optimizer state and the activations of a batch of the data, measured), the
        evaluations run at the step count asked of a checkpoint; refuse what does not fit, warn about what is very
        slow. A refinement schedule is checked by its callback at setup."""
        device = self.trainer.strategy.root_device
        requested = self._requested_manifestation
        for net in refinable_modules(self.model):
            if subcommand == "fit":
                shape = training_batch_shape(self.datamodule) if isinstance(net, ContinuousNet) else None
                estimate = estimate_cost(net, batch_shape=shape, training=True)
                steps = "-".join(str(stage.n_steps) for stage in estimate.stages)
                check_cost(estimate, what=f"training (n_steps {steps})", device=device,
                           fits=lambda share: f"{share:.0%} of it fits: lower batch_size or n_steps, or "
                                              "recompute_steps=True")
            elif requested.get("n_steps") is not None:
                estimate = estimate_cost(net, n_steps=requested["n_steps"], scheme=requested.get("scheme"))
                check_cost(estimate, what=f"evaluating at n_steps={requested['n_steps']}", device=device)


def _section(config: Any, subcommand: str | None) -> Any:
    """The part of a LightningCLI config (parsed or instantiated) that belongs to ``subcommand`` (all of it without
    one)."""
    return config.get(subcommand, config) if subcommand else config


def checkpoint_defaults(config: Any) -> None:
    """Give ``config.checkpoint`` (a parsed LightningCLI config) the model's monitor where the config names none.

    Without ``checkpoint.monitor``, the monitor is the model class's ``monitor`` attribute (``val_acc`` for the
    classifier, ``val_iou`` for the segmenter; a module without one keeps no best checkpoint apart from the last one).
    Without ``checkpoint.mode``, the mode is the class's ``mode`` when it monitors the class's ``monitor``, else
    ``"min"``. Without ``checkpoint.filename``, a monitored checkpoint is named ``best-{epoch}-{<monitor>:.4f}``.
    """
    checkpoint = config.get("checkpoint")
    if checkpoint is None:
        return
    model_class = _model_class(config)
    own_monitor = getattr(model_class, "monitor", None)
    if checkpoint.get("monitor") is None and isinstance(own_monitor, str):
        checkpoint["monitor"] = own_monitor
    if checkpoint.get("mode") is None:
        own = checkpoint.get("monitor") is not None and checkpoint.get("monitor") == own_monitor
        checkpoint["mode"] = getattr(model_class, "mode", "min") if own else "min"
    if checkpoint.get("monitor") is not None and checkpoint.get("filename") is None:
        checkpoint["filename"] = f"best-{{epoch}}-{{{checkpoint['monitor']}:.4f}}"


def _model_class(config: Any) -> type | None:
    """The class that ``config.model.class_path`` names (``None`` if it cannot be imported)."""
    model = config.get("model")
    class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, name = class_path.rsplit(".", 1)
    try:
        found: type | None = getattr(import_module(module), name)
        return found
    except (ImportError, AttributeError):
        return None


@rank_zero_only
def _warn_constant_rate(model: pl.LightningModule) -> None:
    """One line on stderr: LightningCLI's ``--optimizer`` replaces the model's ``configure_optimizers``."""
    schedule = getattr(model, "hparams", {}).get("lr_schedule")
    own = f"its lr_schedule={schedule!r}" if schedule else "its learning-rate schedule"
    sys.stderr.write(
        f"{PROG}: warning: --optimizer without --lr_scheduler replaces {type(model).__name__}.configure_optimizers "
        f"and {own}: the learning rate stays constant; add --lr_scheduler (e.g. --lr_scheduler CosineAnnealingLR "
        "--lr_scheduler.T_max <max_epochs>) to schedule it\n"
    )


@rank_zero_only
def _note_csv_logging() -> None:
    """One line on stderr: without ``tensorboard`` the run's metrics go to ``metrics.csv``."""
    sys.stderr.write(f"{PROG}: tensorboard is not installed: the metrics go to metrics.csv in the run folder "
                     "(pip install tensorboard for TensorBoard event files)\n")


def default_trainer_settings() -> dict[str, Any]:
    """Trainer defaults of the CLI: a TensorBoard logger when ``tensorboard`` is installed, else a CSV logger,
    writing to ``lightning_logs/<name>/version_<n>`` (configs set ``trainer.logger.init_args.name``), and
    checkpoints written atomically (:class:`~lightning_cnet.checkpoint_io.AtomicCheckpointIO`: a full disk or a
    crash mid-write leaves the previous checkpoint intact)."""
    logger = "TensorBoardLogger" if find_spec("tensorboard") is not None else "CSVLogger"
    return {
        "logger": {
            "class_path": f"pytorch_lightning.loggers.{logger}",
            "init_args": {"save_dir": "lightning_logs", "name": "default"},
        },
        "plugins": [{"class_path": "lightning_cnet.checkpoint_io.AtomicCheckpointIO"}],
    }


# ---------------------------------------------------------------------- errors
def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` comes from bad input (reported in one line) rather than from a defect.

    Bad input is this CLI's own :class:`UsageError`, a missing dataset, and the ``ValueError``s and
    ``MisconfigurationException``s the package raises itself when it checks its arguments (told apart by where they
    were raised); any other exception is a defect and keeps its traceback.
    """
    if isinstance(err, (UsageError, DatasetNotFoundError)):
        return True
    return isinstance(err, (ValueError, MisconfigurationException)) and _raised_in(err, ("lightning_cnet.",
                                                                                        "jsonargparse"))


def reported_message(err: BaseException) -> str:
    """What to say about the user error ``err``: for an error of jsonargparse, the package's own error it wraps
    (jsonargparse wraps what a class raises while it builds it) or else the gist of its message; otherwise the
    message of ``err``."""
    if not _raised_in(err, ("jsonargparse",)):
        return one_line(err, sys.maxsize)
    for cause in list(exception_chain(err))[1:]:
        if isinstance(cause, UsageError) or (is_user_error(cause) and _raised_in(cause, ("lightning_cnet.",))):
            return one_line(cause, sys.maxsize)
    return condense(str(err))


def _raised_in(err: BaseException, modules: tuple[str, ...]) -> bool:
    """Whether ``err`` was raised by code of one of ``modules`` (the package's checks, or the argument parser's
    while it validates and instantiates classes)."""
    traceback = err.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return bool(traceback.tb_frame.f_globals.get("__name__", "").startswith(modules))


# ---------------------------------------------------------------------- arguments taken from the data
def explicit_linked_arguments(args: Sequence[str]) -> dict[str, Any]:
    """Values of ``model ... num_classes``/``in_chans`` given on the command line or in ``--config`` files.

    They are taken from the data, so jsonargparse drops them silently; the CLI checks them against the data.
    """
    return explicit_model_options(args, LINKED_FROM_DATA)


def explicit_model_options(args: Sequence[str], names: Sequence[str], *, configs: bool = True) -> dict[str, Any]:
    """Model init arguments ``names`` given on the command line (and, with ``configs``, in ``--config`` files), the
    last one winning as in jsonargparse."""
    found: dict[str, Any] = {}
    pattern = r"(?:\w+\.)?model\.(?:init_args\.)?(?:model_kwargs\.)?(" + "|".join(names) + ")"
    whole = r"(?:\w+\.)?model\.(?:init_args\.)?model_kwargs"
    for key, value in _key_values(list(args)):
        if key == "config" or key.endswith(".config"):
            if configs:
                found.update(_model_options_in_yaml(value, names))
        elif re.fullmatch(pattern, key):
            found[key.rsplit(".", 1)[1]] = _literal(value)
        elif re.fullmatch(whole, key):
            found.update(_options_in(_yaml_value(value), names))
    return found


def _yaml_value(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return None


def _options_in(init_args: Any, names: Sequence[str]) -> dict[str, Any]:
    """``names`` given in a model's init arguments, flat or inside ``model_kwargs`` (the flat form wins)."""
    if not isinstance(init_args, dict):
        return {}
    nested = init_args.get("model_kwargs")
    found = {name: nested[name] for name in names if isinstance(nested, dict) and name in nested}
    found.update({name: init_args[name] for name in names if name in init_args})
    return found


def _key_values(args: list[str]) -> Iterator[tuple[str, str]]:
    for index, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if not eq:
            if index + 1 >= len(args):
                continue
            value = args[index + 1]
        yield ("config" if key == "c" else key), value


def _model_options_in_yaml(path: str, names: Sequence[str]) -> dict[str, Any]:
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}  # jsonargparse reports unreadable files
    model = content.get("model") if isinstance(content, dict) else None
    if not isinstance(model, dict):
        return {}
    return _options_in(model.get("init_args", model), names)


# ---------------------------------------------------------------------- checkpoints given with --ckpt_path
def read_checkpoint(path: str) -> dict[str, Any]:
    """The hyperparameters and the per-stage resolution stored in a checkpoint file.

    Returns:
        ``{"path", "hyper_parameters", "stages"}``, the stages as :class:`~lightning_cnet.resolution.StageResolution`
        (those read before the first that does not decode: loading the file names what is wrong with it).

    Raises:
        UsageError: a missing, unreadable, truncated or non-Lightning file, named with its problem.
    """
    checkpoint = load_checkpoint_file(path)
    state = checkpoint["state_dict"]
    first = next((match for match in map(_STAGE_KEY.fullmatch, state) if match is not None), None)
    stages: list[StageResolution] = []
    while first is not None:
        try:
            resolution = StageResolution.from_state_dict(state, f"{first.group(1)}stages.{len(stages)}.")
        except ValueError:
            break  # the load reports it, with the model's context
        if resolution is None:
            break
        stages.append(resolution)
    return {"path": path, "hyper_parameters": checkpoint.get("hyper_parameters") or {}, "stages": stages}


#: A stage's step count in a state dict: the ContinuousNet's prefix (``model.``, ``model.backbone.body.``) is group 1.
_STAGE_KEY = re.compile(r"(.*?)stages\.0\.resolution\.n_steps")


def requested_manifestation(
    subcommand: str, stored: dict[str, Any], explicit: dict[str, Any], command_line: dict[str, Any]
) -> dict[str, Any]:
    """What explicit options ask of a loaded checkpoint's model: another model is refused; another scheme (or step
    count given on the command line) is applied when evaluating (``validate``, ``test``, ``predict``) and refused
    when resuming ``fit``.

    Returns:
        ``{"scheme": ..., "n_steps": ...}`` to apply after the checkpoint is loaded (possibly empty).

    Raises:
        UsageError: another model, or a manifestation change while resuming training.
    """
    path, trained_model = stored["path"], stored["hyper_parameters"].get("model")
    if "model" in explicit and trained_model is not None and explicit["model"] != trained_model:
        raise UsageError(f"{path} holds a {trained_model!r} model but the options ask for {explicit['model']!r}; "
                         "use the config the checkpoint was trained with")
    stages = stored["stages"]
    request = {}
    if "scheme" in explicit and any(stage.scheme != explicit["scheme"] for stage in stages):
        request["scheme"] = explicit["scheme"]
    if "n_steps" in command_line and any(stage.n_steps != command_line["n_steps"] for stage in stages):
        request["n_steps"] = command_line["n_steps"]
    if request and subcommand == "fit":
        trained = ", ".join(f"{stage.scheme} {stage.n_steps}" for stage in stages)
        asked = ", ".join(f"{key}={value}" for key, value in request.items())
        raise UsageError(f"resuming fit cannot change the manifestation to {asked}: the checkpoint was trained with "
                         f"(scheme, steps per stage) {trained}; remove those options, or evaluate with them "
                         f"(validate, test, predict); checkpoint: {path}")
    return request


class RequestedManifestation(Callback):
    """Evaluate a loaded checkpoint's model at the manifestation the explicit options ask for.

    Args:
        scheme: Runge-Kutta scheme to evaluate with (``None``: as trained).
        n_steps: steps per stage (``None``: as trained).
    """

    def __init__(self, scheme: str | None = None, n_steps: int | None = None) -> None:
        self.scheme = scheme
        self.n_steps = n_steps

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            return
        for net in refinable_modules(pl_module):
            before = net.stage_resolutions
            net.set_manifestation(scheme=self.scheme, n_steps=self.n_steps)
            rank_zero_info(f"{PROG}: evaluating at {net.stage_resolutions[0].scheme}, "
                           f"{'-'.join(str(r.n_steps) for r in net.stage_resolutions)} steps per stage as asked "
                           f"(the checkpoint was trained with {before[0].scheme}, "
                           f"{'-'.join(str(r.n_steps) for r in before)})")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt``, the state at the end of every epoch (replaced each time).

    Lightning's ``save_last`` writes it only when a top-k checkpoint is written, i.e. when the monitored metric
    improved. Its own class keeps its state key apart from any ``ModelCheckpoint`` a config adds.

    Args:
        dirpath: the folder (``None``: the run's ``checkpoints`` folder, where the best checkpoint goes too).
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def last_checkpoint(dirpath: str | Path | None) -> LastCheckpoint:
    """The ``last.ckpt`` callback for a run whose best checkpoint goes to ``dirpath``."""
    return LastCheckpoint(dirpath)


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


# ---------------------------------------------------------------------- stopping
def _stopped_by_signal(trainer: pl.Trainer, name: str) -> str:
    """One line: where a run stopped by a signal stopped, and the checkpoint to resume from."""
    where = f"stopped by {name} at epoch {trainer.current_epoch}, global step {trainer.global_step}"
    last = [Path(checkpoint_folder(cb, trainer)) / "last.ckpt" for cb in trainer.checkpoint_callbacks
            if isinstance(cb, LastCheckpoint)]
    saved = [path for path in last if path.is_file()]
    if not saved:
        return f"{where}; no epoch had finished, so there is no checkpoint to resume from"
    return f"{where}; resume from the end of the last finished epoch with --ckpt_path {shown(saved[0])}"


def _is_full_disk(err: BaseException) -> bool:
    """Whether ``err`` is (or was caused by) a write that the file system refused for lack of space or a read-only
    mount."""
    cause = os_error_in(err)
    return cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


# ---------------------------------------------------------------------- entry point
def main(args: Sequence[str] | None = None) -> None:
    """Run ``lightning-cnet``; bad input ends with one line on stderr and exit status 2.

    Args:
        args: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    try:
        ContinuousNetCLI(args)
    except Interrupted as stop:
        sys.stderr.write(f"{PROG}: {stop}\n")
        raise SystemExit(stop.status) from None
    except Exception as err:  # noqa: BLE001 - only user errors are reported; the rest is re-raised
        if _is_full_disk(err):
            sys.stderr.write(f"{error_line(PROG, err, 160)}; the checkpoints written before are intact\n")
            raise SystemExit(1) from None
        if not is_user_error(err):
            raise
        sys.stderr.write(error_line(PROG, reported_message(err)) + "\n")
        raise SystemExit(2) from None
