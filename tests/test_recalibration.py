"""recalibrate_bn against batch statistics computed by hand for the inputs that reach each piece."""

from __future__ import annotations

import pytest
import torch
from conftest import stacked_time_tensors
from torch import nn

from lightning_cnet import ContinuousNet, recalibrate_bn
from lightning_cnet.layers import TimeBatchNorm2d


def _model(basis: str, n_basis: int, n_steps: int) -> ContinuousNet:
    model = ContinuousNet((4, 8), in_chans=1, num_classes=3, scheme="rk4", n_basis=n_basis, n_steps=n_steps,
                          basis=basis, T=1.0)
    with torch.no_grad():
        for stage in model.stages:
            for gate in stage.gate.gate:
                gate.fill_(0.7)  # open the stages, so that every piece sees a state the earlier ones changed
    return model


def _batches(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 1, 6, 6, generator=generator) * 2 + 0.5 for _ in range(count)]


def _statistics_by_hand(model: ContinuousNet, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the model in training mode (BatchNorm then normalises with batch statistics, so no running statistic
    matters) and average, per piece, the batch mean and unbiased variance of every input that reached it,
    weighted by its node weight; plain BatchNorms average over batches."""
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, TimeBatchNorm2d):
            def hook(layer, args, name=name):
                x, nodes = args
                for index, share in nodes:
                    entry = sums.setdefault((name, index), [torch.zeros(()), 0.0, 0.0])
                    mean = x.double().mean(dim=(0, 2, 3))
                    var = x.double().var(dim=(0, 2, 3), unbiased=True)
                    entry[0] = entry[0] + share * mean
                    entry[1] = entry[1] + share * var
                    entry[2] += share
            handles.append(module.register_forward_pre_hook(hook))
        elif isinstance(module, nn.BatchNorm2d) and not name.rsplit(".", 2)[-2:-1] == ["pieces"]:
            def plain(layer, args, name=name):
                x = args[0].double()
                entry = sums.setdefault((name, -1), [torch.zeros(()), 0.0, 0.0])
                entry[0] = entry[0] + x.mean(dim=(0, 2, 3))
                entry[1] = entry[1] + x.var(dim=(0, 2, 3), unbiased=True)
                entry[2] += 1
            handles.append(module.register_forward_pre_hook(plain))
    model.train()
    with torch.no_grad():
        for images in batches:
            model(images)
    for handle in handles:
        handle.remove()
    expected = {}
    for (name, index), (mean, var, weight) in sums.items():
        key = f"{name}.pieces.{index}" if index >= 0 else name
        expected[f"{key}.running_mean"] = mean / weight
        expected[f"{key}.running_var"] = var / weight
    return expected


@pytest.mark.parametrize(("basis", "n_basis", "n_steps"), [
    ("piecewise_constant", 2, 3),   # the middle step straddles the jump: pieces read by unequal numbers of stages
    ("piecewise_constant", 4, 1),   # one RK4 step reads pieces 0, 2, 2, 3: piece 1 is never read
    ("piecewise_linear", 3, 2),     # stages between nodes mix two nodes with their weights
])
def test_statistics_of_every_piece_are_those_of_the_inputs_that_reach_it(basis, n_basis, n_steps) -> None:
    model = _model(basis, n_basis, n_steps)
    batches = _batches()
    expected = _statistics_by_hand(model, batches)
    with torch.no_grad():  # garbage statistics, which must not matter
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(5.0, 9.0)
    unread = {name: buffer.clone() for name, buffer in model.named_buffers()
              if name.endswith(("running_mean", "running_var")) and name not in expected}
    model.eval()
    recalibrate_bn(model, [(images, torch.zeros(len(images))) for images in batches])
    buffers = dict(model.named_buffers())
    for name, value in expected.items():
        torch.testing.assert_close(buffers[name], value.float(), atol=1e-5, rtol=1e-5, msg=name)
    for name, value in unread.items():  # pieces no stage reads keep their statistics
        assert torch.equal(buffers[name], value), name
    assert (basis, n_basis, n_steps) != ("piecewise_constant", 4, 1) or unread
    assert not model.training and all(not m.training for m in model.modules())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_model_at_its_training_manifestation_changes_by_the_sampling_noise_only() -> None:
    """Running statistics settled by many training batches move about as much as two re-estimations from
    independent batches differ from each other: by the sampling noise, not more."""
    model = _model("piecewise_constant", 2, 2)
    generator = torch.Generator().manual_seed(2)

    def draw(count: int) -> list[torch.Tensor]:
        return [torch.randn(32, 1, 6, 6, generator=generator) * 2 + 0.5 for _ in range(count)]

    model.train()
    with torch.no_grad():
        for images in draw(300):
            model(images)
    settled = stacked_time_tensors(model)
    estimates = []
    for _ in range(2):
        copy = _model("piecewise_constant", 2, 2)
        copy.load_state_dict(model.state_dict())
        recalibrate_bn(copy, draw(10))
        estimates.append(stacked_time_tensors(copy))
    for name in settled:
        if "running" in name:
            moved = (estimates[0][name] - settled[name]).norm().item()
            noise = (estimates[0][name] - estimates[1][name]).norm().item()
            assert moved < 2.5 * noise and moved < 0.15 * settled[name].norm().item(), (name, moved, noise)


def test_bad_input_leaves_the_model_as_it_was() -> None:
    model = _model("piecewise_constant", 2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, message in (([], "no batches"), ([torch.randn(2, 1, 6, 6), "text"], "model input of a batch of type str"),
                         ([torch.randn(2, 5, 6, 6)], r"expects images \[batch, 1, height, width\]")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            recalibrate_bn(model, bad)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="num_batches=0"):
        recalibrate_bn(model, _batches(), num_batches=0)
