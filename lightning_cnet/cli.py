"""The ``lightning-cnet`` command line: a LightningCLI for ContinuousNet classifiers.

``lightning-cnet {fit,validate,test,predict} [--config FILE.yaml] [--key value ...]``; with no config it trains
:class:`~lightning_cnet.module.ContinuousNetClassifier` on :class:`~lightning_cnet.data.DigitsDataModule`.
The model and the data are chosen by ``class_path`` (any subclass of the classifier, any ``LightningDataModule``),
callbacks come from the YAML, the model's ``num_classes`` and ``in_chans`` are taken from the data, checkpoints of
the last and the best epoch (by ``val_acc``) are kept, and the resolved config is saved as ``config.yaml`` in the
run's log directory.

Mistakes in the input (an unknown key or model, a ``num_classes`` that does not match the data, a checkpoint of
another model, a missing dataset) end with one line ``lightning-cnet: error: ...`` on stderr, exit status 2, and
no files left from the failed run.

``lightning-cnet predict`` writes ``predictions.csv`` (sample index, predicted class, class probabilities) to the
run's log directory and names it in its last log line; ``lightning-cnet --version`` prints the version;
``--optimizer`` without ``--lr_scheduler`` warns, in one line, that the model's own optimizer and schedule are
replaced by a constant learning rate.

Example:
    >>> main(["fit", "--config", "configs/digits.yaml", "--trainer.max_epochs", "1"])  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import csv
import difflib
import inspect
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from types import MethodType
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
import yaml
from torch.optim import Optimizer
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_cnet import __version__
from lightning_cnet.callbacks import refinable_modules
from lightning_cnet.data import DatasetNotFoundError
from lightning_cnet.latest_run import LatestRunLink
from lightning_cnet.module import ContinuousNetClassifier
from lightning_cnet.progress_bar import CompactRichProgressBar, CompactTQDMProgressBar

PROG = "lightning-cnet"
DEFAULT_MODEL = "lightning_cnet.module.ContinuousNetClassifier"
DEFAULT_DATA = "lightning_cnet.data.DigitsDataModule"
#: Model arguments that are taken from the data module (``data.X`` is linked to ``model.init_args.X``).
LINKED_FROM_DATA = ("num_classes", "in_chans")
#: Model options compared with a loaded checkpoint (``n_steps`` only when given on the command line: a config's
#: ``n_steps`` is where training starts, before refinement).
MANIFESTATION_OPTIONS = ("model", "scheme", "n_steps")


class UsageError(Exception):
    """A mistake in the command line, the config or the files it names; reported as one line."""


class _Parser(LightningArgumentParser):
    """A LightningArgumentParser whose errors raise :class:`UsageError` with a one-line message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` must not pass for `max_epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UsageError(condense_parser_error(message, parser)) from ex


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
        super().__init__(
            ContinuousNetClassifier,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_Parser,
            args=args,
            **kwargs,
        )

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
        parser.set_defaults({
            "checkpoint.monitor": "val_acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best-{epoch}-{val_acc:.4f}",
        })

    def _parse_ckpt_path(self) -> None:
        """Check the ``--ckpt_path`` file and the explicit model options against it before LightningCLI reads its
        hyperparameters into the config (which would silently replace the explicit options)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path:
            stored = read_checkpoint(path)
            self._requested_manifestation = requested_manifestation(
                subcommand, stored, self._explicit_model_options, self._command_line_model_options
            )
        super()._parse_ckpt_path()

    def after_instantiate_classes(self) -> None:
        """Reject a ``num_classes``/``in_chans`` given for the model that differs from the data's."""
        for name, value in self._explicit_links.items():
            data_value = getattr(self.datamodule, name, None)
            if data_value is not None and value != data_value:
                raise UsageError(
                    f"model {name}={value} does not match {type(self.datamodule).__name__}, which has "
                    f"{name}={data_value}; remove model.init_args.{name} (it is taken from the data)"
                )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """LightningCLI builds ``--optimizer``/``--lr_scheduler`` at parse time from the model's parameters; let them
        train the parameters the model has when the Trainer asks for its optimizers, i.e. after a checkpoint was
        loaded (which may have refined the ODE stages to a finer resolution)."""
        given = {key: bool(self._get(self.config_init, key)) for key in ("optimizer", "lr_scheduler")}
        constant_rate = given["optimizer"] and not given["lr_scheduler"]
        with warnings.catch_warnings():
            if constant_rate:  # said below in one line, with what is lost
                warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by")
            super()._add_configure_optimizers_method_to_model(subcommand)
        configure = self.model.__dict__.get("configure_optimizers")
        if configure is not None:
            self.model.configure_optimizers = MethodType(_on_current_parameters(configure), self.model)
            if constant_rate:
                _warn_constant_rate(self.model)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> pl.Trainer:
        """Add the ``last.ckpt`` checkpoint beside the best one, the requested manifestation of a loaded checkpoint,
        the compact progress bar (:mod:`lightning_cnet.progress_bar`, rich when ``rich`` is installed) when no other
        progress bar is configured, the ``latest`` link to the run for ``fit``, and the CSV
        prediction writer to ``predict`` when no prediction writer is configured."""
        best = next((cb for cb in callbacks if isinstance(cb, ModelCheckpoint)), None)
        if best is not None:
            callbacks = [*callbacks, last_checkpoint(best.dirpath)]
        if self._requested_manifestation:
            callbacks = [*callbacks, RequestedManifestation(**self._requested_manifestation)]
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(isinstance(cb, ProgressBar) for cb in configured):
            callbacks = [*callbacks, CompactRichProgressBar() if find_spec("rich") else CompactTQDMProgressBar()]
        if self.subcommand == "fit":
            callbacks = [*callbacks, LatestRunLink()]
        if isinstance(config.get("logger"), CSVLogger) and find_spec("tensorboard") is None:
            _note_csv_logging()
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in configured):
            callbacks = [*callbacks, PredictionCSVWriter()]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        new_directories = _directories_to_be_created(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            if is_user_error(err):
                _remove_unfinished(new_directories)
            raise


def _on_current_parameters(configure: Callable[[], Any]) -> Callable[[pl.LightningModule], Any]:
    """Wrap LightningCLI's ``configure_optimizers``: an optimizer it built at parse time holds one param group of the
    parameters the model had then and has not stepped yet; point that group at the model's current parameters."""

    def configure_optimizers(module: pl.LightningModule) -> Any:
        result = configure()
        for optimizer in _optimizers_in(result):
            if not optimizer.state and len(optimizer.param_groups) == 1:
                optimizer.param_groups[0]["params"] = list(module.parameters())
        return result

    return configure_optimizers


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


def _optimizers_in(value: Any) -> Iterator[Optimizer]:
    if isinstance(value, Optimizer):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _optimizers_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _optimizers_in(item)


def default_trainer_settings() -> dict[str, Any]:
    """Trainer defaults of the CLI: a TensorBoard logger when ``tensorboard`` is installed, else a CSV logger,
    writing to ``lightning_logs/<name>/version_<n>`` (configs set ``trainer.logger.init_args.name``)."""
    logger = "TensorBoardLogger" if find_spec("tensorboard") is not None else "CSVLogger"
    return {
        "logger": {
            "class_path": f"pytorch_lightning.loggers.{logger}",
            "init_args": {"save_dir": "lightning_logs", "name": "default"},
        }
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


def _raised_in(err: BaseException, modules: tuple[str, ...]) -> bool:
    """Whether ``err`` was raised by code of one of ``modules`` (the package's checks, or the argument parser's
    while it validates and instantiates classes)."""
    traceback = err.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame.f_globals.get("__name__", "").startswith(modules)


def one_line(err: BaseException, limit: int = 200) -> str:
    """The message of ``err`` on one line of at most ``limit`` characters, leading with the specific problem of a
    parser error's list (``Errors: - ...``) rather than its generic header."""
    lines = [part.strip() for part in str(err).splitlines() if part.strip()]
    bullets = _meaningful_bullets(lines)
    text = bullets[0] if bullets else " ".join(lines) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def condense_parser_error(message: str, parser: Any = None) -> str:
    """Turn a (multi-line) jsonargparse error into one line that names the key and what is accepted.

    Example:
        >>> condense_parser_error('Parser key "model":\\n  Errors:\\n    - Option \\'n_stepz\\' is not accepted')
        "model: unknown option 'n_stepz'; did you mean 'n_steps'? Accepted: model, num_classes, ..."
    """
    lines = [line for line in message.splitlines() if line.strip()]
    header = re.match(r'Parser key "([\w.]+)":\s*(.*)', lines[0]) if lines else None
    key = header.group(1) if header else ""
    details = _meaningful_bullets(lines[1:]) or ([header.group(2)] if header and header.group(2) else [])
    if not header:
        text = " ".join(line.strip() for line in lines)
        return _suggest_option(text, parser)
    detail = details[0] if details else "invalid value"
    unknown = re.match(r"Option '([\w.]+)' is not accepted", detail)
    if unknown:
        accepted = _accepted_options(key, message)
        hint = difflib.get_close_matches(unknown.group(1), accepted, n=1)
        text = f"{key}: unknown option {unknown.group(1)!r}"
        text += f"; did you mean {hint[0]!r}?" if hint else ""
        return text + (f" Accepted: {', '.join(accepted)}" if accepted else "")
    if "Expected a dot import path" in detail or "either not accessible or invalid" in detail:
        return f"{key}: {detail}; give the full import path of a class, e.g. --{key}.help to list the options"
    return f"{key}: {detail}"


def _meaningful_bullets(lines: list[str]) -> list[str]:
    """The ``- ...`` error bullets that say something specific, each joined with its indented continuation."""
    generic = ("Expected a <class 'NoneType'>", "Does not validate against any of the Union subtypes",
               "Not a valid subclass of", "a class path", "a dict ", "Expected a path but")
    bullets: list[str] = []
    for index, line in enumerate(lines):
        text = line.strip()
        if not text.startswith("- ") or any(text[2:].startswith(g) for g in generic):
            continue
        text = text[2:]
        if text.endswith(":") and index + 1 < len(lines) and not lines[index + 1].strip().startswith("- "):
            text = f"{text.rstrip(':')}: {lines[index + 1].strip()}"
        bullets.append(re.sub(r'^Parser key "([\w.]+)"', r"\1", text))
    return bullets


def _accepted_options(key: str, message: str) -> list[str]:
    """Init argument names of the class that ``key`` configures (from its ``class_path`` in the message)."""
    given = re.search(r"'class_path': '([\w.]+)'", message)
    class_path = given.group(1) if given else {"model": DEFAULT_MODEL, "data": DEFAULT_DATA}.get(key)
    if class_path is None:
        return []
    try:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs", "backbone")]
    return [p for p in names if not (key == "model" and p in LINKED_FROM_DATA)]


def _suggest_option(text: str, parser: Any) -> str:
    """Add a 'did you mean' to messages about an unknown option, using the parser's known keys."""
    unknown = re.search(r"does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", text)
    if not unknown or parser is None:
        return text
    option = unknown.group(1) or unknown.group(2)
    try:
        known = [str(k) for k in parser.get_defaults().keys()]
    except Exception:  # noqa: BLE001 - a suggestion is optional
        return text
    hint = difflib.get_close_matches(option, known, n=1)
    return f"{text}; did you mean {hint[0]!r}?" if hint else text


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
    pattern = r"(?:\w+\.)?model\.(?:init_args\.)?(" + "|".join(names) + ")"
    for key, value in _key_values(list(args)):
        if key == "config" or key.endswith(".config"):
            if configs:
                found.update(_model_options_in_yaml(value, names))
        elif re.fullmatch(pattern, key):
            found[key.rsplit(".", 1)[1]] = _literal(value)
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
    init_args = model.get("init_args", model)
    return {name: init_args[name] for name in names if isinstance(init_args, dict) and name in init_args}


# ---------------------------------------------------------------------- checkpoints given with --ckpt_path
def read_checkpoint(path: str) -> dict[str, Any]:
    """The hyperparameters and the per-stage resolution stored in a checkpoint file.

    Raises:
        UsageError: a missing, unreadable, truncated or non-Lightning file, named with its problem.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - whatever torch cannot read is not a checkpoint
        raise UsageError(f"{path}: not a readable checkpoint ({one_line(error, 120)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UsageError(f"{path}: not a Lightning checkpoint (it has no state_dict)")
    state = checkpoint["state_dict"]
    stages = []
    index = 0
    while f"model.stages.{index}.resolution.n_steps" in state:
        prefix = f"model.stages.{index}.resolution."
        stages.append({"scheme": bytes(state[prefix + "scheme"].tolist()).decode("utf-8", "replace"),
                       "n_steps": int(state[prefix + "n_steps"].item())})
        index += 1
    return {"path": path, "hyper_parameters": checkpoint.get("hyper_parameters") or {}, "stages": stages}


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
    if "scheme" in explicit and any(stage["scheme"] != explicit["scheme"] for stage in stages):
        request["scheme"] = explicit["scheme"]
    if "n_steps" in command_line and any(stage["n_steps"] != command_line["n_steps"] for stage in stages):
        request["n_steps"] = command_line["n_steps"]
    if request and subcommand == "fit":
        trained = ", ".join(f"{stage['scheme']} {stage['n_steps']}" for stage in stages)
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

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def last_checkpoint(dirpath: str | None) -> LastCheckpoint:
    """The ``last.ckpt`` callback for a run whose best checkpoint goes to ``dirpath``."""
    return LastCheckpoint(dirpath)


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


# ---------------------------------------------------------------------- cleaning up after a failed run
def _directories_to_be_created(trainer: pl.Trainer) -> list[Path]:
    """Directories this run would write to that do not exist yet, deepest first."""
    candidates = [trainer.log_dir] if trainer.log_dir else []
    candidates += [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    created: list[Path] = []
    for candidate in candidates:
        path = Path(candidate).absolute()
        while not path.exists() and path not in created:
            created.append(path)
            path = path.parent
    return created


def _remove_unfinished(directories: list[Path]) -> None:
    """Remove the directories a failed run created, unless it already saved a checkpoint there."""
    for directory in directories:
        if directory.is_dir() and not any(directory.rglob("*.ckpt")):
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------- entry point
def main(args: Sequence[str] | None = None) -> None:
    """Run ``lightning-cnet``; bad input ends with one line on stderr and exit status 2.

    Args:
        args: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    try:
        ContinuousNetCLI(args)
    except Exception as err:  # noqa: BLE001 - only user errors are reported; the rest is re-raised
        if not is_user_error(err):
            raise
        prefix = f"{PROG}: error: "
        sys.stderr.write(f"{prefix}{one_line(err, 200 - len(prefix))}\n")
        raise SystemExit(2) from None
