"""The evaluation seam: the model input of any batch, and what a validation_step logs, reduced like Lightning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_cnet import get_model, recalibrate_bn
from lightning_cnet.batches import batch_size, model_input, to_device
from lightning_cnet.evaluation import LoggedValues, defines, measure_validation


@dataclass
class Sample:
    image: torch.Tensor
    label: torch.Tensor


class Pair(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor


def test_the_model_input_of_every_batch_structure():
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    for batch in (x, (x, y), [x, y], {"image": x, "mask": y}, {"inputs": x}, Sample(x, y), Pair(x, y)):
        assert model_input(batch) is x
    assert batch_size({"image": x, "mask": y}) == 4 and batch_size(Sample(x, y)) == 4 and batch_size("text") == 1

    class Module:
        def model_input(self, batch):
            return batch["pixels"]

    assert model_input({"pixels": x}, Module()) is x
    with pytest.raises(ValueError, match=r"batch of type dict with keys \['mask', 'pixels'\].*define model_input"):
        model_input({"pixels": x, "mask": y})


def test_to_device_keeps_the_structure_and_casts_floating_tensors():
    moved = to_device({"image": torch.ones(2), "mask": torch.ones(2, dtype=torch.long), "pair": Pair(torch.ones(1),
                       torch.zeros(1, dtype=torch.long))}, "cpu", torch.float64)
    assert moved["image"].dtype == torch.float64 and moved["mask"].dtype == torch.long
    assert isinstance(moved["pair"], Pair) and moved["pair"].inputs.dtype == torch.float64


def test_logged_values_are_reduced_like_an_epoch():
    recorder = LoggedValues()
    for value, size in ((1.0, 3), (5.0, 1)):  # a smaller last batch weighs less: (3 * 1 + 1 * 5) / 4 = 2
        recorder.batch_size = size
        recorder.log("val_loss", torch.tensor(value))
        recorder.log("val_peak", value, reduce_fx="max")
        recorder.log("val_count", value, reduce_fx="sum")
        recorder.log("val_given", value, batch_size=1)
        recorder.log("val_map", torch.ones(3))  # not a scalar: ignored
    accuracy = MulticlassAccuracy(3, average="micro")
    accuracy.update(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2]))
    recorder.log("val_acc", accuracy)
    assert recorder.values() == {"val_loss": 2.0, "val_peak": 5.0, "val_count": 6.0, "val_given": 3.0,
                                 "val_acc": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="reduce_fx='median'"):
        recorder.log("val_median", 1.0, reduce_fx="median")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.accuracy = MulticlassAccuracy(3, average="micro")
        self.validation_step_outputs: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        logits = self.net(batch.image)
        self.validation_step_outputs.append(logits)
        self.accuracy.update(logits, batch.label)
        self.log("val_acc", self.accuracy)
        self.log("val_loss", nn.functional.cross_entropy(logits, batch.label))


def test_measuring_a_validation_step_leaves_the_module_as_it_was():
    torch.manual_seed(0)
    module = Classifier().train()
    batches = [Sample(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    module.accuracy.update(torch.eye(3)[[0]], torch.tensor([0]))  # one sample already counted this epoch
    module.validation_step_outputs.append(torch.zeros(1, 3))  # and one output kept for the epoch's end
    before_state = {k: v.clone() for k, v in module.accuracy.metric_state.items()}
    rng = torch.get_rng_state()
    values = measure_validation(module, batches, max_batches=2)
    logits = module.net(torch.cat([b.image for b in batches[:2]]))
    labels = torch.cat([b.label for b in batches[:2]])
    assert values["val_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert values["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert module.training and all(m.training for m in module.modules())
    assert torch.equal(torch.get_rng_state(), rng) and "log" not in vars(module)
    assert len(module.validation_step_outputs) == 1
    for name, value in module.accuracy.metric_state.items():
        assert torch.equal(value, before_state[name])
    assert module.accuracy.compute().item() == 1.0  # still the one sample counted before


def test_a_module_without_its_own_validation_step_measures_nothing():
    assert measure_validation(nn.Linear(2, 2), [torch.randn(1, 2)]) == {}
    assert defines(Classifier(), "validation_step") and not defines(nn.Linear(1, 1), "validation_step")


def test_recalibration_reads_the_input_of_dict_and_dataclass_batches():
    images = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    reference = get_model("cnet_digits", scheme="rk4", n_steps=2).eval()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    recalibrate_bn(reference, images)
    for batches in ([{"image": x, "mask": x[:, 0] > 0} for x in images],
                    [Sample(x, torch.zeros(8)) for x in images]):
        model = get_model("cnet_digits", scheme="rk4", n_steps=2).eval()
        model.load_state_dict(initial)
        recalibrate_bn(model, batches)
        for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
            if name.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(ours, theirs, msg=name)
    model = get_model("cnet_digits").eval()
    recalibrate_bn(model, [{"pixels": x} for x in images], inputs=lambda batch: batch["pixels"])
    assert all(math.isfinite(v) for v in model.state_dict()["norm.running_mean"].tolist())
