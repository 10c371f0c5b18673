"""``lightning-cnet-analyze``: manifestation and compression studies of a trained checkpoint, and training curves.

Each study writes a CSV table and a PNG next to each other and prints the table::

    lightning-cnet-analyze manifestation --ckpt_path RUN/checkpoints/last.ckpt --out RUN/analysis
    lightning-cnet-analyze compression --ckpt_path RUN/checkpoints/last.ckpt --n_basis 4 2 1 --out RUN/analysis
    lightning-cnet-analyze curve --metrics RUN/metrics.csv --out RUN/analysis/val_acc.png

The data are those the checkpoint was trained on: the ``data`` section of the ``config.yaml`` that the
``lightning-cnet`` CLI saved in the run directory (or ``--config``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_cnet.analysis import (
    compression_sweep,
    manifestation_sweep,
    plot_manifestation,
    plot_training_curve,
    write_csv,
)
from lightning_cnet.module import ContinuousNetClassifier


def _find_config(ckpt_path: Path) -> Path:
    for directory in ckpt_path.resolve().parents[:3]:
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml found in the three directories above {ckpt_path}; pass the training config with --config"
    )


def build_datamodule(config_path: Path) -> Any:
    """Instantiate the ``data`` section (``class_path`` and ``init_args``) of a LightningCLI config."""
    data = (yaml.safe_load(config_path.read_text()) or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{config_path} has no 'data: {{class_path: ..., init_args: ...}}' section")
    module_name, _, class_name = data["class_path"].rpartition(".")
    datamodule_class = getattr(importlib.import_module(module_name), class_name)
    return datamodule_class(**(data.get("init_args") or {}))


def _dataloader(args: argparse.Namespace) -> Any:
    datamodule = build_datamodule(Path(args.config) if args.config else _find_config(Path(args.ckpt_path)))
    datamodule.prepare_data()
    datamodule.setup("test" if args.split == "test" else "validate")
    return datamodule.test_dataloader() if args.split == "test" else datamodule.val_dataloader()


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns))


def _manifestation(args: argparse.Namespace) -> None:
    task = ContinuousNetClassifier.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    trained = ", ".join(sorted({f"{r.scheme} {r.n_steps} steps" for r in task.model.resolution}))
    rows = manifestation_sweep(task.model, _dataloader(args), schemes=args.schemes, n_steps=args.n_steps)
    out = Path(args.out)
    write_csv(rows, out / "manifestation.csv")
    plot_manifestation(rows, out / "manifestation.png", trained=trained)
    _print_rows(rows)
    print(f"wrote {out / 'manifestation.csv'} and {out / 'manifestation.png'}")


def _compression(args: argparse.Namespace) -> None:
    task = ContinuousNetClassifier.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    rows = compression_sweep(task.model, _dataloader(args), n_basis=args.n_basis, n_steps=args.n_steps)
    out = Path(args.out)
    write_csv(rows, out / "compression.csv")
    _print_rows(rows)
    print(f"wrote {out / 'compression.csv'}")


def _curve(args: argparse.Namespace) -> None:
    path = plot_training_curve(args.metrics, args.out, metric=args.metric)
    print(f"wrote {path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-cnet-analyze", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def study(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--ckpt_path", required=True, help="checkpoint written by lightning-cnet fit")
        sub.add_argument("--config", help="training config (default: config.yaml of the checkpoint's run)")
        sub.add_argument("--split", choices=["test", "val"], default="test", help="data split to evaluate on")
        sub.add_argument("--out", default="analysis", help="output directory")
        return sub

    manifestation = study("manifestation", "accuracy for every scheme and step count")
    manifestation.add_argument("--schemes", nargs="+", default=["euler", "midpoint", "rk4"])
    manifestation.add_argument("--n_steps", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    manifestation.set_defaults(run=_manifestation)
    compression = study("compression", "accuracy, parameters and latency after projection onto fewer coefficients")
    compression.add_argument("--n_basis", nargs="+", type=int, required=True)
    compression.add_argument("--n_steps", nargs="+", type=int, help="step counts (default: equal to n_basis)")
    compression.set_defaults(run=_compression)
    curve = commands.add_parser("curve", help="a metric against epoch with refinement epochs marked")
    curve.add_argument("--metrics", required=True, help="metrics.csv written by the CSV logger")
    curve.add_argument("--metric", default="val_acc")
    curve.add_argument("--out", default="training_curve.png", help="PNG file to write")
    curve.set_defaults(run=_curve)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-cnet-analyze``; user errors print one line and exit with status 2."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"lightning-cnet-analyze: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
