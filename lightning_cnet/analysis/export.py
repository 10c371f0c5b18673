"""Export a trained model at one fixed manifestation: a ``torch.export`` program, and ONNX where ``onnx`` is installed.

The exported graph is checked against the eager model on an example batch before anything is written, and written
atomically.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", scheme="rk4", n_steps=2)
    >>> path = export_program(model, torch.randn(2, 1, 8, 8), "/tmp/cnet_digits_rk4_2.pt2")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_cnet.analysis._files import write_atomically


def _check_close(exported: torch.Tensor, eager: torch.Tensor, what: str) -> None:
    if exported.shape != eager.shape or not torch.allclose(exported, eager, rtol=1e-4, atol=1e-5):
        difference = (exported - eager).abs().max().item() if exported.shape == eager.shape else "shape"
        raise RuntimeError(f"the {what} does not reproduce the eager model (max |difference| {difference}); "
                           "nothing was written")


@torch.no_grad()
def export_program(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write ``torch.export.export(model, (example,))`` to ``path`` (``.pt2``), after checking it equals eager.

    The model is exported in eval mode with its current manifestation baked in (steps and scheme are static).

    Raises:
        RuntimeError: the exported program's output differs from the eager output on ``example``.
    """
    model = model.eval()
    program = torch.export.export(model, (example,))
    _check_close(program.module()(example), model(example), "exported program")
    return write_atomically(path, lambda temporary: torch.export.save(program, temporary))


def onnx_available() -> bool:
    """Whether ``onnx`` is installed (it is needed to check an ONNX export)."""
    return importlib.util.find_spec("onnx") is not None


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write the model as ONNX to ``path`` after checking, with ``onnx``'s reference evaluator, that it equals eager.

    Uses the ``torch.export``-based exporter when ``onnxscript`` is installed, the TorchScript-based one otherwise.

    Raises:
        ImportError: ``onnx`` is not installed.
        RuntimeError: the ONNX graph's output differs from the eager output on ``example``.
    """
    if not onnx_available():
        raise ImportError("ONNX export needs the onnx package: pip install onnx")
    from onnx.reference import ReferenceEvaluator

    model = model.eval()
    dynamo = importlib.util.find_spec("onnxscript") is not None

    def write(temporary: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(temporary), dynamo=dynamo, input_names=["images"],
                              output_names=["logits"])
        evaluator = ReferenceEvaluator(str(temporary))
        output = torch.from_numpy(evaluator.run(None, {"images": example.cpu().numpy()})[0])
        _check_close(output, model(example).cpu(), "ONNX graph")

    return write_atomically(path, write)
