"""Export a trained model at one fixed manifestation: a ``torch.export`` program, and ONNX where ``onnx`` is installed.

Both take any batch size (the batch dimension is exported as dynamic; every other dimension is the example's). The
exported graph is checked against the eager model on the example batch and on a batch of one before anything is
written, and written atomically.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", scheme="rk4", n_steps=2)
    >>> path = export_program(model, torch.randn(2, 1, 8, 8), "/tmp/cnet_digits_rk4_2.pt2")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_cnet.analysis._files import write_atomically

#: Name of the dynamic batch dimension in the exported program and the ONNX graph.
BATCH = "batch"


def _traced_example(example: torch.Tensor) -> torch.Tensor:
    """The example to trace with: at least two rows, so that the exporter does not specialise the batch size to 1."""
    return example if len(example) > 1 else torch.cat([example, example])


def _check_batches(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, example: torch.Tensor,
                   what: str) -> None:
    """Compare ``run`` with the eager model on ``example`` and on its first row alone."""
    for batch in (example, example[:1]):
        _check_close(run(batch), model(batch), what)


def _check_close(exported: torch.Tensor, eager: torch.Tensor, what: str) -> None:
    if exported.shape != eager.shape or not torch.allclose(exported, eager, rtol=1e-4, atol=1e-5):
        difference = (exported - eager).abs().max().item() if exported.shape == eager.shape else "shape"
        raise RuntimeError(f"the {what} does not reproduce the eager model (max |difference| {difference}); "
                           "nothing was written")


@torch.no_grad()
def export_program(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write ``torch.export.export(model, (example,))`` to ``path`` (``.pt2``), after checking it equals eager.

    The model is exported in eval mode with its current manifestation baked in (steps and scheme are static). The
    batch dimension is dynamic: the program runs batches of any size (``torch.export.load(path).module()(images)``).

    Args:
        model: the model to export.
        example: an example batch ``[B, ...]``; the program takes batches ``[*, ...]`` of the same other sizes.
        path: where to write.

    Raises:
        RuntimeError: the exported program's output differs from the eager output on ``example`` or on its first
            image alone; nothing is written.
    """
    model = model.eval()
    program = torch.export.export(model, (_traced_example(example),),
                                  dynamic_shapes=({0: torch.export.Dim(BATCH, min=1)},))
    _check_batches(program.module(), model, example, "exported program")
    return write_atomically(path, lambda temporary: torch.export.save(program, temporary))


def onnx_available() -> bool:
    """Whether ``onnx`` is installed (it is needed to check an ONNX export)."""
    return importlib.util.find_spec("onnx") is not None


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write the model as ONNX to ``path`` after checking, with ``onnx``'s reference evaluator, that it equals eager.

    Uses the ``torch.export``-based exporter when ``onnxscript`` is installed, the TorchScript-based one otherwise.
    The graph's input ``images`` and output ``logits`` have a dynamic batch dimension named ``batch``.

    Raises:
        ImportError: ``onnx`` is not installed.
        RuntimeError: the ONNX graph's output differs from the eager output on ``example`` or on its first image
            alone; nothing is written.
    """
    if not onnx_available():
        raise ImportError("ONNX export needs the onnx package: pip install onnx")
    from onnx.reference import ReferenceEvaluator

    model = model.eval()
    dynamo = importlib.util.find_spec("onnxscript") is not None

    def write(temporary: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (_traced_example(example),), str(temporary), dynamo=dynamo,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: BATCH}, "logits": {0: BATCH}})
        evaluator = ReferenceEvaluator(str(temporary))

        def run(batch: torch.Tensor) -> torch.Tensor:
            outputs = cast(list[Any], evaluator.run(None, {"images": batch.cpu().numpy()}))  # not intermediate: a list
            return torch.from_numpy(outputs[0]).to(batch.device)

        _check_batches(run, model, example, "ONNX graph")

    return write_atomically(path, write)
