"""``lightning-cnet-analyze``: studies of trained checkpoints, each written as CSV tables and a PNG.

::

    lightning-cnet-analyze manifestation --ckpt_path A.ckpt [B.ckpt ...] [--recalibrate_bn] --out DIR
    lightning-cnet-analyze convergence --ckpt_path A.ckpt [--schemes ...] [--n_steps ...] --out DIR
    lightning-cnet-analyze depth --ckpt_path A.ckpt [B.ckpt ...] --out DIR
    lightning-cnet-analyze compression --ckpt_path A.ckpt --pairs 8:8 4:4 2:2 [--save DIR] --out DIR
    lightning-cnet-analyze export --ckpt_path A.ckpt --scheme rk4 --n_steps 4 --out model.pt2 [--onnx]
    lightning-cnet-analyze curve --metrics RUN --out RUN/analysis/val_acc.png

The data are those a checkpoint was trained on: the ``data`` section of the ``config.yaml`` that ``lightning-cnet``
saved in the run directory (or ``--config``), and so is the class of the module (``model.class_path``; default the
classifier). A classifier is measured by accuracy and cross-entropy; any other module (the segmenter, a user's own)
by what its ``validation_step`` logs, with the studied ContinuousNet in the place of its own. As with LightningCLI,
only ``LightningDataModule`` and ``LightningModule`` subclasses are built from it, but importing the module its
``class_path`` names runs that module's code: a config file is as trusted as code. Bad input ends with one line
``lightning-cnet-analyze: error: ...``, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

import lightning_cnet
from lightning_cnet._atomic import os_error_in, remove_stale_temporaries
from lightning_cnet._cli_common import UsageError, error_line, load_checkpoint_file, one_line
from lightning_cnet.analysis import _files
from lightning_cnet.analysis._files import check_writable, write_atomically, write_csv
from lightning_cnet.analysis.compression import check_pairs, compressed, compression_sweep, parse_pair
from lightning_cnet.analysis.convergence import convergence_study
from lightning_cnet.analysis.depth_profile import depth_profile
from lightning_cnet.analysis.evaluation import Batches, as_batches
from lightning_cnet.analysis.export import export_onnx, export_program
from lightning_cnet.analysis.manifestation import check_sweep_arguments, default_schemes, manifestation_sweep
from lightning_cnet.analysis.plots import (
    plot_compression,
    plot_convergence,
    plot_depth_profile,
    plot_manifestation,
    plot_training_curve,
    require_matplotlib,
)
from lightning_cnet.batches import model_input
from lightning_cnet.callbacks.depth_refinement import refinable_modules
from lightning_cnet.cost import (
    WARN_EVALUATIONS_PER_STAGE,
    ResolutionCostWarning,
    check_export_evaluations,
    check_step_count,
)
from lightning_cnet.integrators import get_scheme
from lightning_cnet.metrics_reader import read_scalars

PROG = "lightning-cnet-analyze"
SPLITS = ("test", "val", "train")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---------------------------------------------------------------------- inputs
def load_task(ckpt_path: str, model_class: type[Any] | None = None) -> Any:
    """The LightningModule of a checkpoint written by ``lightning-cnet fit`` (or any Trainer), in eval mode.

    Args:
        ckpt_path: the checkpoint.
        model_class: its LightningModule class (default: :class:`~lightning_cnet.module.ContinuousNetClassifier`).
    """
    from lightning_cnet.module import ContinuousNetClassifier

    model_class = model_class or ContinuousNetClassifier
    path = Path(ckpt_path)
    load_checkpoint_file(path)
    try:
        task = model_class.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    except Exception as error:  # noqa: BLE001 - a checkpoint of another model is bad input
        raise UsageError(f"{path}: cannot be loaded as {model_class.__name__}: {one_line(error)}") from None
    if not refinable_modules(task):
        raise UsageError(f"{path}: {model_class.__name__} holds no ContinuousNet to study")
    return task


def backbone(task: Any) -> Any:
    """The (first) ContinuousNet inside ``task``: what the studies change and measure."""
    return refinable_modules(task)[0]


def model_class(config_path: Path | None) -> type | None:
    """The ``LightningModule`` subclass that ``model.class_path`` names in a LightningCLI config (``None``: none)."""
    if config_path is None:
        return None
    try:
        content = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"{config_path}: {one_line(error)}") from None
    model = content.get("model") if isinstance(content, dict) else None
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if class_path is None:
        return None
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(_module_bases(), "model", required=True, instantiate=False)
    try:
        parser.parse_object({"model": {"class_path": class_path}})
        module, name = str(class_path).rsplit(".", 1)
        found: type | None = getattr(__import__(module, fromlist=[name]), name)
        return found
    except Exception as error:  # noqa: BLE001 - a class path jsonargparse refuses is bad input
        raise UsageError(f"{config_path}: model.class_path {class_path!r} is not a LightningModule the package can "
                         f"load: {one_line(error)}") from None


def find_config(ckpt_path: str) -> Path:
    """The ``config.yaml`` of the checkpoint's run: in one of the three folders above it."""
    for directory in Path(ckpt_path).resolve().parents[:3]:
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    raise UsageError(f"no config.yaml in the three folders above {ckpt_path}; pass the training config with --config")


def build_datamodule(config_path: Path) -> Any:
    """Instantiate the ``data`` section of a LightningCLI config, accepting only ``LightningDataModule`` subclasses."""
    from jsonargparse import ArgumentParser

    try:
        content = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"{config_path}: {one_line(error)}") from None
    data = content.get("data") if isinstance(content, dict) else None
    if not isinstance(data, dict) or "class_path" not in data:
        raise UsageError(f"{config_path} has no 'data: {{class_path: ..., init_args: ...}}' section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(_datamodule_bases(), "data", required=True)
    try:
        return parser.instantiate(parser.parse_object({"data": data})).data
    except Exception as error:  # noqa: BLE001 - a data section jsonargparse refuses is bad input
        raise UsageError(f"{config_path}: the data section is not a LightningDataModule the package can build: "
                         f"{one_line(error)}") from None


def _datamodule_bases() -> tuple[type, ...]:
    return _lightning_bases("LightningDataModule")


def _module_bases() -> tuple[type, ...]:
    return _lightning_bases("LightningModule")


def _lightning_bases(name: str) -> tuple[type, ...]:
    import pytorch_lightning as pl

    bases: list[type] = [getattr(pl, name)]
    try:
        import lightning.pytorch as L

        bases.append(getattr(L, name))
    except ImportError:
        pass
    return tuple(bases)


def dataloader(datamodule: Any, split: str) -> Any:
    """The datamodule's loader of ``split`` (``train`` batches in evaluation order are not needed: any order)."""
    stage = {"test": "test", "val": "validate", "train": "fit"}[split]
    method = getattr(datamodule, f"{'val' if split == 'val' else split}_dataloader", None)
    try:
        datamodule.prepare_data()
        datamodule.setup(stage)
        loader = method() if callable(method) else None
    except Exception as error:  # noqa: BLE001 - a data module that cannot give the split (Lightning raises its own)
        if "must be implemented" in str(error):
            loader = None
        else:
            raise UsageError(f"{type(datamodule).__name__} cannot give the {split!r} split: "
                             f"{one_line(error)}") from None
    if loader is None:
        raise UsageError(f"{type(datamodule).__name__} has no {split!r} split: expected one of {list(SPLITS)}")
    return loader


def _labels(paths: Sequence[str], given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise UsageError(f"--labels needs one label per checkpoint: {len(paths)} checkpoints, {len(given)} labels")
        return list(given)
    labels = [f"{Path(p).resolve().parents[1].name}/{Path(p).stem}" if len(Path(p).resolve().parents) > 1
              else Path(p).stem for p in paths]
    return labels if len(set(labels)) == len(labels) else [f"{i}:{label}" for i, label in enumerate(labels)]


class _Inputs:
    """Checkpoints, data and output folder of a study, all checked before any work."""

    def __init__(self, args: argparse.Namespace, *, needs_data: bool = True) -> None:
        paths = args.ckpt_path if isinstance(args.ckpt_path, list) else [args.ckpt_path]
        self.out = check_writable(args.out) if getattr(args, "out", None) else None
        if self.out is not None:
            remove_stale_temporaries(self.out)
        self.labels = _labels(paths, getattr(args, "labels", None))
        if getattr(args, "config", None):
            config: Path | None = Path(args.config)
        elif needs_data:
            config = find_config(paths[0])
        else:
            config = next((c for c in (_config_near(p) for p in paths[:1]) if c is not None), None)
        self.tasks = [load_task(path, model_class(config)) for path in paths]
        self.nets = [backbone(task) for task in self.tasks]
        self.paths = paths
        if not needs_data:
            return
        from lightning_cnet.classification import ClassificationTask

        measuring = next((task for task in self.tasks if not isinstance(task, ClassificationTask)), None)
        assert config is not None  # with needs_data: --config, or the checkpoint's own (find_config raises)
        datamodule = build_datamodule(config)
        self.datamodule = datamodule
        self.batches = as_batches(dataloader(datamodule, args.split), limit=args.num_batches, task=measuring)
        self.recalibration = None
        if getattr(args, "recalibrate_bn", False):
            self.recalibration = as_batches(dataloader(datamodule, "train"), limit=args.recalibration_batches,
                                            task=measuring)

    @property
    def folder(self) -> Path:
        """The output folder (``--out``) of a study that writes files."""
        if self.out is None:
            raise UsageError("--out is empty: give the folder to write the study's files to")
        return self.out

    def batches_of(self, task: Any) -> Batches:
        """The evaluation batches, measured by ``task`` unless it is a classifier (accuracy and cross-entropy)."""
        if self.batches.task is None:
            return self.batches
        measured = Batches(self.batches)
        measured.task = task
        return measured

    def metric(self, rows: Sequence[dict[str, Any]]) -> str:
        """The column plotted: ``accuracy`` for a classifier, else the task's ``monitor`` (or its first metric)."""
        if "accuracy" in rows[0]:
            return "accuracy"
        monitor = getattr(self.tasks[0], "monitor", None)
        fixed = {"checkpoint", "scheme", "n_steps", "bn", "trained", "n_basis", "parameters", "logit_distance",
                 "ms_per_batch", "function_evaluations"}
        return monitor if monitor in rows[0] else next(key for key in rows[0] if key not in fixed)


def _config_near(ckpt_path: str) -> Path | None:
    try:
        return find_config(ckpt_path)
    except UsageError:
        return None


# ---------------------------------------------------------------------- output
def _print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(_format(row.get(c, "")) for c in columns))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


# ---------------------------------------------------------------------- subcommands
def _check_step_counts(args: argparse.Namespace) -> None:
    """Refuse step counts beyond :data:`~lightning_cnet.cost.MAX_STEPS_PER_STAGE` and warn about very slow sweeps,
    before any checkpoint is read (the counts a sweep derives from a checkpoint are checked when they are set)."""
    counts = list(args.n_steps or [])
    reference = args.reference_steps or (16 * max(counts) if counts else None)
    for option, values in (("--n_steps", counts), ("--reference_steps", [reference] if reference else [])):
        for value in values:
            check_step_count(value, f"{option} {value}: n_steps")
    if reference and 4 * reference > WARN_EVALUATIONS_PER_STAGE:  # the reference is RK4
        warnings.warn(f"the RK4 reference at {reference} steps evaluates each stage {4 * reference} times per batch "
                      f"(above {WARN_EVALUATIONS_PER_STAGE}): expect it to be slow; --reference_steps sets it",
                      ResolutionCostWarning, stacklevel=2)


def _manifestation(args: argparse.Namespace) -> None:
    check_sweep_arguments(args.schemes or [], args.n_steps or [])
    _check_step_counts(args)
    inputs = _Inputs(args)
    rows_by_label = {}
    for label, task, net in zip(inputs.labels, inputs.tasks, inputs.nets):
        rows = manifestation_sweep(net, inputs.batches_of(task), schemes=args.schemes, n_steps=args.n_steps,
                                   reference_steps=args.reference_steps, reference_rtol=args.reference_rtol,
                                   recalibration=inputs.recalibration,
                                   recalibration_batches=args.recalibration_batches)
        rows_by_label[label] = [{"checkpoint": label, **row} for row in rows]
    all_rows = [row for rows in rows_by_label.values() for row in rows]
    table = write_csv(all_rows, inputs.folder / "manifestation.csv")
    picture = plot_manifestation(rows_by_label, inputs.folder / "manifestation.png", metric=inputs.metric(all_rows))
    _print_rows(all_rows, [column for column in all_rows[0] if column != "reference_steps"])
    references = dict.fromkeys((row["checkpoint"], row["bn"], row["reference_steps"]) for row in all_rows)
    print("reference: rk4 at " + ", ".join(f"{steps} steps ({label}, {mode})" for label, mode, steps in references))
    print(f"wrote {table} and {picture}")


def _convergence(args: argparse.Namespace) -> None:
    check_sweep_arguments(args.schemes or [], args.n_steps or [])
    _check_step_counts(args)
    inputs = _Inputs(args)
    errors, orders = convergence_study(inputs.nets[0], inputs.batches, schemes=args.schemes,
                                       n_steps=args.n_steps, reference_steps=args.reference_steps)
    written = [write_csv(errors, inputs.folder / "convergence.csv"),
               write_csv(orders, inputs.folder / "convergence_orders.csv"),
               plot_convergence(errors, orders, inputs.folder / "convergence.png")]
    _print_rows([row for row in orders if row["output"] == "logits"])
    print("wrote " + ", ".join(str(path) for path in written))


def _depth(args: argparse.Namespace) -> None:
    inputs = _Inputs(args, needs_data=False)
    pieces, stages = {}, {}
    for label, net in zip(inputs.labels, inputs.nets):
        pieces[label], stages[label] = depth_profile(net, label=label)
    all_stages = [row for rows in stages.values() for row in rows]
    written = [write_csv([row for rows in pieces.values() for row in rows], inputs.folder / "depth_profile.csv"),
               write_csv(all_stages, inputs.folder / "depth_smoothness.csv"),
               plot_depth_profile(pieces, stages, inputs.folder / "depth_profile.png")]
    _print_rows(all_stages)
    print("wrote " + ", ".join(str(path) for path in written))


def _compression(args: argparse.Namespace) -> None:
    if not args.pairs:
        raise UsageError("give the (n_basis, n_steps) pairs to evaluate, e.g. --pairs 8:8 4:4 2:2")
    pairs = [parse_pair(text) for text in args.pairs]
    for _, n_steps in pairs:
        check_step_count(n_steps)
    if args.save:
        check_writable(args.save)
        remove_stale_temporaries(args.save)  # of an earlier --save that was killed mid-write
    inputs = _Inputs(args)
    task, net, path = inputs.tasks[0], inputs.nets[0], inputs.paths[0]
    check_pairs(net, pairs)
    rows = compression_sweep(net, inputs.batches_of(task), pairs=pairs)
    resolution = net.resolution[0]
    written = [write_csv(rows, inputs.folder / "compression.csv"),
               plot_compression(rows, inputs.folder / "compression.png",
                                trained=(resolution.n_basis, resolution.n_steps), metric=inputs.metric(rows))]
    if args.save:
        written += [save_compressed(path, task, k, n, Path(args.save)) for k, n in pairs]
    _print_rows(rows)
    print("wrote " + ", ".join(str(p) for p in written))


def save_compressed(ckpt_path: str, task: Any, n_basis: int, n_steps: int, directory: Path) -> Path:
    """Write the checkpoint of ``task`` compressed to ``(n_basis, n_steps)`` so that ``load_from_checkpoint`` and
    ``lightning-cnet test`` load it: the model's tensors and hyperparameters (built at the compressed resolution), no
    optimizer or loop state."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    net = backbone(task)
    prefix = next(name for name, module in task.named_modules() if module is net) + "."
    model = compressed(net, n_basis, n_steps)
    kept = {key: value for key, value in checkpoint.items()
            if key not in ("state_dict", "optimizer_states", "lr_schedulers", "loops")}
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    resolution = {"n_basis": n_basis, "n_steps": n_steps}
    if isinstance(hparams.get("model_kwargs"), dict):
        hparams["model_kwargs"] = {**hparams["model_kwargs"], **resolution}
    hparams.update({key: value for key, value in resolution.items() if key in hparams or "model_kwargs" not in hparams})
    kept["hyper_parameters"] = hparams
    kept["state_dict"] = {**{k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefix)},
                          **{f"{prefix}{k}": v for k, v in model.state_dict().items()}}
    target = directory / f"{Path(ckpt_path).stem}-K{n_basis}-N{n_steps}.ckpt"
    return write_atomically(target, lambda temporary: torch.save(kept, temporary))


def _export(args: argparse.Namespace) -> None:
    check_sweep_arguments([args.scheme], [args.n_steps])
    check_step_count(args.n_steps)
    out = _output_file(args.out)
    check_writable(out.parent)
    args.num_batches, args.split = 1, args.split
    inputs = _Inputs(args)
    model = inputs.nets[0]
    stages = len(getattr(model, "stages", [None]))
    check_export_evaluations(stages * args.n_steps * get_scheme(args.scheme).n_stages, args.n_steps, args.scheme)
    model.set_manifestation(scheme=args.scheme, n_steps=args.n_steps)
    example = model_input(inputs.batches[0], inputs.tasks[0])
    written = [export_program(model, example, out)]
    if args.onnx:
        written.append(export_onnx(model, example, out.with_suffix(".onnx")))
    print(f"wrote {', '.join(str(p) for p in written)} ({args.scheme}, {args.n_steps} steps per stage, any batch "
          f"size; checked equal to eager on batches of {len(example)} and 1)")


def _output_file(text: str) -> Path:
    """``--out`` of a command that writes one file: not a folder."""
    out = Path(text)
    if out.is_dir() or text.endswith(("/", "\\")):
        raise UsageError(f"--out {text}: is a folder; expected a file name, e.g. {out / 'val_acc.png'}")
    return out


def _curve(args: argparse.Namespace) -> None:
    out = _output_file(args.out)
    check_writable(out.parent)
    try:
        points = read_scalars(args.metrics, args.metric)
    except FileNotFoundError as error:
        raise UsageError(f"{args.metrics}: {one_line(error)}") from None
    try:
        refinements = [value for _, value in read_scalars(args.metrics, "refinement/epoch")]
    except ValueError:  # no refinement in this run
        refinements = []
    run = Path(args.metrics).resolve()
    title = f"{args.metric}: {run.parent.name}/{run.name}" if run.is_dir() else f"{args.metric}: {run.name}"
    print(f"wrote {plot_training_curve(points, refinements, out, metric=args.metric, title=title)}")


# ---------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"{PROG} {lightning_cnet.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    schemes = f"schemes (default: all registered but the embedded pairs: {', '.join(default_schemes())})"

    def study(name: str, help_text: str, *, many: bool = False, data: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--ckpt_path", required=True, nargs="+" if many else None,
                         help="checkpoint(s) written by lightning-cnet fit")
        if many:
            sub.add_argument("--labels", nargs="+", help="one label per checkpoint (default: run folder/file name)")
        if data:
            sub.add_argument("--config", help="training config (default: config.yaml of the checkpoint's run)")
            sub.add_argument("--split", choices=SPLITS, default="test", help="data split to evaluate on")
            sub.add_argument("--num_batches", type=int, default=None, help="evaluate at most this many batches")
        sub.add_argument("--out", default="analysis", help="output folder")
        sub.add_argument("--threads", type=int, default=None,
                         help="torch intra-op threads (default: LIGHTNING_CNET_THREADS, OMP_NUM_THREADS or the cores "
                              "the load average leaves free)")
        return sub

    manifestation = study("manifestation", "accuracy and logit distance for every scheme and step count", many=True)
    manifestation.add_argument("--schemes", nargs="+", help=schemes)
    manifestation.add_argument("--n_steps", nargs="+", type=int,
                               help="step counts (default: 1 2 3 4 6 8 12 16 ... up to twice the trained count)")
    manifestation.add_argument("--reference_steps", type=int,
                               help="RK4 steps of the reference (default: the first of 2, 4, ... 16 x the largest "
                                    "step count whose logits change by at most --reference_rtol from half as many)")
    manifestation.add_argument("--reference_rtol", type=float, default=1e-4,
                               help="convergence tolerance of the reference (relative change of the logits)")
    manifestation.add_argument("--recalibrate_bn", action="store_true",
                               help="also evaluate with BatchNorm statistics re-estimated at each manifestation")
    manifestation.add_argument("--recalibration_batches", type=int, default=10, help="training batches to use")
    manifestation.set_defaults(run=_manifestation)

    convergence = study("convergence", "error against step count and fitted order per scheme")
    convergence.add_argument("--schemes", nargs="+", help=schemes)
    convergence.add_argument("--n_steps", nargs="+", type=int, help="step counts (default: 1 2 3 4 6 ... 4 x K)")
    convergence.add_argument("--reference_steps", type=int, help="RK4 steps of the reference (default: 16 x max)")
    convergence.set_defaults(run=_convergence, num_batches=2)

    depth = study("depth", "theta(t) across depth: norms, jumps between pieces, gates, smoothness", many=True,
                  data=False)
    depth.set_defaults(run=_depth)

    compression = study("compression", "accuracy, parameters and latency after projection onto fewer pieces")
    compression.add_argument("--pairs", nargs="+", metavar="K:N", help="(n_basis, n_steps) pairs, e.g. 8:8 4:4 2:2")
    compression.add_argument("--save", help="also write each compressed model as a checkpoint into this folder")
    compression.set_defaults(run=_compression)

    export = study("export", "a torch.export program (and ONNX) of the model at one manifestation")
    export.add_argument("--scheme", required=True)
    export.add_argument("--n_steps", type=int, required=True)
    export.add_argument("--onnx", action="store_true", help="also write an ONNX file (needs onnx)")
    export.set_defaults(run=_export)

    curve = commands.add_parser("curve", help="a metric against epoch with refinement epochs marked")
    curve.add_argument("--metrics", required=True,
                       help="a run folder (its metrics.csv or TensorBoard event files), a metrics.csv or an event file")
    curve.add_argument("--metric", default="val_acc")
    curve.add_argument("--out", default="training_curve.png", help="PNG file to write")
    curve.set_defaults(run=_curve, threads=None)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-cnet-analyze``; bad input prints one line and exits with status 2, a file system that
    refuses the outputs (full, read-only) one line and status 1; either way what the command wrote is removed."""
    with _files.recording() as written, warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            args = _parser().parse_args(argv)
            if args.command != "export":
                require_matplotlib()
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            args.run(args)
        except (UsageError, ValueError, ImportError) as error:
            written.remove_all()
            print(error_line(PROG, error, 400), file=sys.stderr)  # room for a path and the cause
            raise SystemExit(2) from None
        except (OSError, RuntimeError) as error:  # torch's writers wrap the OSError of a full disk
            written.remove_all()
            cause = os_error_in(error)
            if cause is None or cause.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
                raise
            print(f"{PROG}: error: cannot write {cause.filename or 'the outputs'}: {cause.strerror}; the files this "
                  "command created were removed", file=sys.stderr)
            raise SystemExit(1) from None


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


if __name__ == "__main__":  # through the launcher, as the console script: the same thread count
    from lightning_cnet.launcher import analyze_main

    analyze_main()
