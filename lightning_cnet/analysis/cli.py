"""``lightning-cnet-analyze``: studies of trained checkpoints, each written as CSV tables and a PNG.

::

    lightning-cnet-analyze manifestation --ckpt_path A.ckpt [B.ckpt ...] [--recalibrate_bn] --out DIR
    lightning-cnet-analyze convergence --ckpt_path A.ckpt [--schemes ...] [--n_steps ...] --out DIR
    lightning-cnet-analyze depth --ckpt_path A.ckpt [B.ckpt ...] --out DIR
    lightning-cnet-analyze compression --ckpt_path A.ckpt --pairs 8:8 4:4 2:2 [--save DIR] --out DIR
    lightning-cnet-analyze export --ckpt_path A.ckpt --scheme rk4 --n_steps 4 --out model.pt2 [--onnx]
    lightning-cnet-analyze curve --metrics RUN --out RUN/analysis/val_acc.png

The data are those a checkpoint was trained on: the ``data`` section of the ``config.yaml`` that ``lightning-cnet``
saved in the run directory (or ``--config``). As with LightningCLI, only a ``LightningDataModule`` subclass is
built from it, but importing the module its ``class_path`` names runs that module's code: a config file is as
trusted as code. Bad input ends with one line ``lightning-cnet-analyze: error: ...``, exit status 2, and nothing
written.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

import lightning_cnet
from lightning_cnet.analysis._files import check_writable, write_atomically, write_csv
from lightning_cnet.analysis.compression import check_pairs, compressed, compression_sweep, parse_pair
from lightning_cnet.analysis.convergence import convergence_study
from lightning_cnet.analysis.depth_profile import depth_profile
from lightning_cnet.analysis.evaluation import as_batches
from lightning_cnet.analysis.export import export_onnx, export_program
from lightning_cnet.analysis.manifestation import check_sweep_arguments, manifestation_sweep
from lightning_cnet.analysis.plots import (
    plot_compression,
    plot_convergence,
    plot_depth_profile,
    plot_manifestation,
    plot_training_curve,
    require_matplotlib,
)
from lightning_cnet.integrators import list_schemes
from lightning_cnet.metrics_reader import read_scalars

PROG = "lightning-cnet-analyze"
SPLITS = ("test", "val", "train")


class UsageError(Exception):
    """Bad input to the command; reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---------------------------------------------------------------------- inputs
def load_task(ckpt_path: str) -> Any:
    """The ContinuousNetClassifier of a checkpoint written by ``lightning-cnet fit`` (or any Trainer)."""
    from lightning_cnet.module import ContinuousNetClassifier

    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"{path}: not a readable checkpoint ({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UsageError(f"{path}: not a Lightning checkpoint of a ContinuousNet classifier (no state_dict and "
                         "hyper_parameters)")
    try:
        return ContinuousNetClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    except Exception as error:  # noqa: BLE001 - a checkpoint of another model is bad input
        raise UsageError(f"{path}: not a checkpoint of a ContinuousNet classifier ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


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
        raise UsageError(f"{config_path}: {_first_line(error)}") from None
    data = content.get("data") if isinstance(content, dict) else None
    if not isinstance(data, dict) or "class_path" not in data:
        raise UsageError(f"{config_path} has no 'data: {{class_path: ..., init_args: ...}}' section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(_datamodule_bases(), "data", required=True)
    try:
        return parser.instantiate(parser.parse_object({"data": data})).data
    except Exception as error:  # noqa: BLE001 - a data section jsonargparse refuses is bad input
        raise UsageError(f"{config_path}: the data section is not a LightningDataModule the package can build: "
                         f"{_first_line(error)}") from None


def _datamodule_bases() -> tuple[type, ...]:
    import pytorch_lightning as pl

    bases: list[type] = [pl.LightningDataModule]
    try:
        import lightning.pytorch as L

        bases.append(L.LightningDataModule)
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
                             f"{_first_line(error)}") from None
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
        self.labels = _labels(paths, getattr(args, "labels", None))
        self.tasks = [load_task(path) for path in paths]
        self.paths = paths
        if not needs_data:
            return
        datamodule = build_datamodule(Path(args.config) if args.config else find_config(paths[0]))
        self.datamodule = datamodule
        self.batches = as_batches(dataloader(datamodule, args.split), limit=args.num_batches)
        self.recalibration = None
        if getattr(args, "recalibrate_bn", False):
            self.recalibration = as_batches(dataloader(datamodule, "train"), limit=args.recalibration_batches)


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
def _manifestation(args: argparse.Namespace) -> None:
    check_sweep_arguments(args.schemes or [], args.n_steps or [])
    inputs = _Inputs(args)
    rows_by_label = {}
    for label, task in zip(inputs.labels, inputs.tasks):
        rows = manifestation_sweep(task.model, inputs.batches, schemes=args.schemes, n_steps=args.n_steps,
                                   reference_steps=args.reference_steps, reference_rtol=args.reference_rtol,
                                   recalibration=inputs.recalibration,
                                   recalibration_batches=args.recalibration_batches)
        rows_by_label[label] = [{"checkpoint": label, **row} for row in rows]
    all_rows = [row for rows in rows_by_label.values() for row in rows]
    table = write_csv(all_rows, inputs.out / "manifestation.csv")
    picture = plot_manifestation(rows_by_label, inputs.out / "manifestation.png")
    _print_rows(all_rows, ["checkpoint", "scheme", "n_steps", "bn", "trained", "accuracy", "loss", "logit_distance",
                           "ms_per_batch", "function_evaluations"])
    references = dict.fromkeys((row["checkpoint"], row["bn"], row["reference_steps"]) for row in all_rows)
    print("reference: rk4 at " + ", ".join(f"{steps} steps ({label}, {mode})" for label, mode, steps in references))
    print(f"wrote {table} and {picture}")


def _convergence(args: argparse.Namespace) -> None:
    check_sweep_arguments(args.schemes or [], args.n_steps or [])
    inputs = _Inputs(args)
    errors, orders = convergence_study(inputs.tasks[0].model, inputs.batches, schemes=args.schemes,
                                       n_steps=args.n_steps, reference_steps=args.reference_steps)
    written = [write_csv(errors, inputs.out / "convergence.csv"),
               write_csv(orders, inputs.out / "convergence_orders.csv"),
               plot_convergence(errors, orders, inputs.out / "convergence.png")]
    _print_rows([row for row in orders if row["output"] == "logits"])
    print("wrote " + ", ".join(str(path) for path in written))


def _depth(args: argparse.Namespace) -> None:
    inputs = _Inputs(args, needs_data=False)
    pieces, stages = {}, {}
    for label, task in zip(inputs.labels, inputs.tasks):
        pieces[label], stages[label] = depth_profile(task.model, label=label)
    all_stages = [row for rows in stages.values() for row in rows]
    written = [write_csv([row for rows in pieces.values() for row in rows], inputs.out / "depth_profile.csv"),
               write_csv(all_stages, inputs.out / "depth_smoothness.csv"),
               plot_depth_profile(pieces, stages, inputs.out / "depth_profile.png")]
    _print_rows(all_stages)
    print("wrote " + ", ".join(str(path) for path in written))


def _compression(args: argparse.Namespace) -> None:
    if not args.pairs:
        raise UsageError("give the (n_basis, n_steps) pairs to evaluate, e.g. --pairs 8:8 4:4 2:2")
    pairs = [parse_pair(text) for text in args.pairs]
    if args.save:
        check_writable(args.save)
    inputs = _Inputs(args)
    task, path = inputs.tasks[0], inputs.paths[0]
    check_pairs(task.model, pairs)
    rows = compression_sweep(task.model, inputs.batches, pairs=pairs)
    resolution = task.model.resolution[0]
    written = [write_csv(rows, inputs.out / "compression.csv"),
               plot_compression(rows, inputs.out / "compression.png", trained=(resolution.n_basis, resolution.n_steps))]
    if args.save:
        written += [save_compressed(path, task, k, n, Path(args.save)) for k, n in pairs]
    _print_rows(rows)
    print("wrote " + ", ".join(str(p) for p in written))


def save_compressed(ckpt_path: str, task: Any, n_basis: int, n_steps: int, directory: Path) -> Path:
    """Write the checkpoint of ``task`` compressed to ``(n_basis, n_steps)`` so that ``load_from_checkpoint`` and
    ``lightning-cnet test`` load it: the model's tensors and hyperparameters (built at the compressed resolution), no
    optimizer or loop state."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = compressed(task.model, n_basis, n_steps)
    kept = {key: value for key, value in checkpoint.items()
            if key not in ("state_dict", "optimizer_states", "lr_schedulers", "loops")}
    kept["hyper_parameters"] = {**checkpoint["hyper_parameters"], "n_basis": n_basis, "n_steps": n_steps}
    kept["state_dict"] = {**{k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")},
                          **{f"model.{k}": v for k, v in model.state_dict().items()}}
    target = directory / f"{Path(ckpt_path).stem}-K{n_basis}-N{n_steps}.ckpt"
    return write_atomically(target, lambda temporary: torch.save(kept, temporary))


def _export(args: argparse.Namespace) -> None:
    check_sweep_arguments([args.scheme], [args.n_steps])
    out = Path(args.out)
    check_writable(out.parent)
    args.num_batches, args.split = 1, args.split
    inputs = _Inputs(args)
    model = inputs.tasks[0].model
    model.set_manifestation(scheme=args.scheme, n_steps=args.n_steps)
    example = inputs.batches[0][0]
    written = [export_program(model, example, out)]
    if args.onnx:
        written.append(export_onnx(model, example, out.with_suffix(".onnx")))
    print(f"wrote {', '.join(str(p) for p in written)} ({args.scheme}, {args.n_steps} steps per stage, checked equal "
          f"to eager on a batch of {len(example)})")


def _curve(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_writable(out.parent)
    try:
        points = read_scalars(args.metrics, args.metric)
    except FileNotFoundError as error:
        raise UsageError(f"{args.metrics}: {_first_line(error)}") from None
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
    schemes = f"schemes (default: all registered: {', '.join(list_schemes())})"

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
    """Entry point of ``lightning-cnet-analyze``; bad input prints one line and exits with status 2."""
    try:
        args = _parser().parse_args(argv)
        if args.command != "export":
            require_matplotlib()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        args.run(args)
    except (UsageError, ValueError, ImportError) as error:
        print(f"{PROG}: error: {_first_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # through the launcher, as the console script: the same thread count
    from lightning_cnet.launcher import analyze_main

    analyze_main()
