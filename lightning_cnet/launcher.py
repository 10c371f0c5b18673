"""Entry points of ``lightning-cnet`` and ``lightning-cnet-analyze``: quick answers first, then the real commands.

``--version`` and the top-level ``--help`` are answered here without importing torch or Lightning (a second, not
the tens of seconds those imports take on a busy machine). Every other command line gets its torch thread count
(:mod:`lightning_cnet.threads`) before torch is imported and is handed to :func:`lightning_cnet.cli.main` or
:func:`lightning_cnet.analysis.cli.main`.

Example:
    >>> lightning_cnet_main(["--version"])  # doctest: +SKIP
    lightning-cnet 0.2.0
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections.abc import Sequence

from lightning_cnet.threads import ThreadSettingError, configure_threads

CLI_PROG = "lightning-cnet"
ANALYZE_PROG = "lightning-cnet-analyze"

#: ``lightning-cnet`` subcommands (LightningCLI's) and what each does.
CLI_COMMANDS = {
    "fit": "train a model (and resume one with --ckpt_path)",
    "validate": "one evaluation epoch on the validation split",
    "test": "one evaluation epoch on the test split",
    "predict": "class probabilities of the predict split, written to predictions.csv",
}

#: ``lightning-cnet-analyze`` subcommands and what each does (as in its parser).
ANALYZE_COMMANDS = {
    "manifestation": "accuracy and logit distance for every scheme and step count",
    "convergence": "error against step count and fitted order per scheme",
    "depth": "theta(t) across depth: norms, jumps between pieces, gates, smoothness",
    "compression": "accuracy, parameters and latency after projection onto fewer pieces",
    "export": "a torch.export program (and ONNX) of the model at one manifestation",
    "curve": "a metric against epoch with refinement epochs marked",
}

_ENVIRONMENT = """\
environment:
  LIGHTNING_CNET_THREADS  torch threads (default: the cores the load average
                          leaves free, all of them on an idle machine)
  OMP_NUM_THREADS         used when LIGHTNING_CNET_THREADS is not set"""


def _commands(commands: dict[str, str]) -> str:
    """One entry per subcommand, wrapped at 80 columns."""
    indent = " " * (max(map(len, commands)) + 4)
    return "\n".join(textwrap.fill(text, 80, initial_indent=f"  {name:<{len(indent) - 2}}", subsequent_indent=indent)
                     for name, text in commands.items())


def cli_help() -> str:
    """The top-level ``lightning-cnet --help``."""
    return f"""\
usage: {CLI_PROG} [-h] [--version] [-c CONFIG] [--print_config[=flags]]
                      {{{','.join(CLI_COMMANDS)}}} ...

ContinuousNet classifiers with PyTorch Lightning (a LightningCLI).

subcommands ({CLI_PROG} SUBCOMMAND --help lists all options):
{_commands(CLI_COMMANDS)}

options:
  -h, --help              show this help message and exit
  --version               show the version and exit
  -c, --config CONFIG     a YAML config file (see configs/)
  --print_config[=flags]  print the resolved configuration and exit

{_ENVIRONMENT}

example:
  {CLI_PROG} fit --config configs/hard_digits.yaml
"""


def analyze_help() -> str:
    """The top-level ``lightning-cnet-analyze --help``."""
    return f"""\
usage: {ANALYZE_PROG} [-h] [--version]
       {{{','.join(ANALYZE_COMMANDS)}}} ...

Studies of trained checkpoints, each written as CSV tables and a PNG.

subcommands ({ANALYZE_PROG} SUBCOMMAND --help lists all options):
{_commands(ANALYZE_COMMANDS)}

options:
  -h, --help     show this help message and exit
  --version      show the version and exit

{_ENVIRONMENT}

example:
  {ANALYZE_PROG} manifestation --ckpt_path RUN/checkpoints/last.ckpt \\
      --recalibrate_bn --out analysis
"""


def _quick_answer(prog: str, args: Sequence[str], help_text: str) -> bool:
    """Print the version or the top-level help if that is all ``args`` ask for."""
    if list(args) == ["--version"]:
        import lightning_cnet

        print(f"{prog} {lightning_cnet.__version__}")
        return True
    if list(args) in (["--help"], ["-h"]):
        print(help_text, end="")
        return True
    return False


def _prepare(prog: str) -> None:
    """Set the thread count before torch is imported; a bad setting ends with one line and exit status 2."""
    try:
        chosen = configure_threads()
    except ThreadSettingError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        raise SystemExit(2) from None
    if chosen:
        sys.stderr.write(f"{prog}: {chosen}\n")


def _quiet_lightning_warnings(args: Sequence[str]) -> None:
    """Silence, in this command only, what a user of it cannot act on: the ``LeafSpec`` deprecation that Lightning's
    data loader utilities raise with torch >= 2.10 on every run, and, when evaluating a checkpoint (``validate``,
    ``test``, ``predict``, which write no checkpoint), Lightning's notice that the checkpoint callback's state is
    not reloaded because this run logs to another folder."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning,
                            module=r"(pytorch_lightning|lightning\.pytorch)\.utilities\._pytree")
    if next((arg for arg in args if arg in CLI_COMMANDS), None) in ("validate", "test", "predict"):
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")


def lightning_cnet_main(args: Sequence[str] | None = None) -> None:
    """``lightning-cnet``: the ContinuousNet LightningCLI (:func:`lightning_cnet.cli.main`).

    Args:
        args: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    if _quick_answer(CLI_PROG, sys.argv[1:] if args is None else args, cli_help()):
        return
    _prepare(CLI_PROG)
    _quiet_lightning_warnings(sys.argv[1:] if args is None else args)
    from lightning_cnet.cli import main

    main(None if args is None else list(args))  # LightningCLI reads sys.argv itself (and warns if given both)


def analyze_main(args: Sequence[str] | None = None) -> None:
    """``lightning-cnet-analyze``: studies of checkpoints (:func:`lightning_cnet.analysis.cli.main`).

    Args:
        args: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    if _quick_answer(ANALYZE_PROG, sys.argv[1:] if args is None else args, analyze_help()):
        return
    _prepare(ANALYZE_PROG)
    from lightning_cnet.analysis.cli import main

    main(None if args is None else list(args))
