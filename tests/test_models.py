"""ContinuousNet against a hand-built ResNet, hand-counted parameters, and the backbone surface."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import stacked_time_tensors
from torch import nn

from lightning_cnet.bases import BASES
from lightning_cnet.integrators import SCHEMES, make_tableau
from lightning_cnet.models import MODELS, ContinuousNet, get_model, list_models
from lightning_cnet.ode_block import StageResolution
from lightning_cnet.units import UNITS

WIDTHS = (4, 8)


def _tiny(**kwargs) -> ContinuousNet:
    return ContinuousNet(WIDTHS, **{"in_chans": 2, "num_classes": 3, **kwargs})


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items() if torch.is_tensor(value)}


def _assert_same_state(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = _state(module)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------- against a hand-built ResNet
class ReferenceStitch(nn.Module):
    """A stride-2 pre-activation block with a 1x1 strided shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        return self.shortcut(x) + self.conv2(F.relu(self.bn2(y)))


class ReferenceResNet(nn.Module):
    """stem -> stage -> stitch -> stage -> BN -> ReLU -> mean pool -> linear, with a ContinuousNet's weights."""

    def __init__(self, model: ContinuousNet, resnet_stage_like) -> None:
        super().__init__()
        self.stem = nn.Conv2d(model.stem.in_channels, model.stem.out_channels, 3, padding=1, bias=False)
        self.stages = nn.ModuleList(resnet_stage_like(stage) for stage in model.stages)
        self.stitches = nn.ModuleList(
            ReferenceStitch(stitch.conv1.in_channels, stitch.conv1.out_channels) for stitch in model.stitches
        )
        self.norm = nn.BatchNorm2d(model.num_features)
        self.fc = nn.Linear(model.num_features, model.num_classes)
        pairs = [(self.stem, model.stem), (self.norm, model.norm), (self.fc, model.fc)]
        for mine, theirs in zip(self.stitches, model.stitches):
            pairs += [(mine.bn1, theirs.norm1), (mine.conv1, theirs.conv1), (mine.bn2, theirs.norm2),
                      (mine.conv2, theirs.conv2), (mine.shortcut, theirs.shortcut)]
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())
        self.to(model.stem.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.stem(x))
        for stitch, stage in zip(self.stitches, self.stages[1:]):
            x = stage(stitch(x))
        return self.fc(F.relu(self.norm(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("skip_init", [False, True])
def test_euler_continuous_net_is_a_resnet(resnet_stage_like, randomize, skip_init: bool) -> None:
    model = randomize(_tiny(scheme="euler", n_steps=(2, 3), skip_init=skip_init)).double()
    reference = ReferenceResNet(model, resnet_stage_like)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    model.train(), reference.train()
    torch.testing.assert_close(model(x), reference(x), atol=1e-12, rtol=0)
    ours = [model.norm.running_mean, model.norm.running_var]
    theirs = [reference.norm.running_mean, reference.norm.running_var]
    for mine, ref in zip(model.stitches, reference.stitches):
        for stats in ("running_mean", "running_var"):
            ours += [getattr(mine.norm1, stats), getattr(mine.norm2, stats)]
            theirs += [getattr(ref.bn1, stats), getattr(ref.bn2, stats)]
    for stage, ref_stage in zip(model.stages, reference.stages):
        for k, unit in enumerate(ref_stage):
            for stats in ("running_mean", "running_var"):
                ours += [getattr(stage.unit.norm1.pieces[k], stats), getattr(stage.unit.norm2.pieces[k], stats)]
                theirs += [getattr(unit.bn1, stats), getattr(unit.bn2, stats)]
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref, atol=1e-14, rtol=0)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), atol=1e-12, rtol=0)


def _hand_count(widths: tuple[int, ...], n_basis: int, in_chans: int, num_classes: int) -> int:
    stem = in_chans * widths[0] * 9
    # per coefficient: two 3x3 convolutions, two BatchNorm affines, one gate
    stages = sum(n_basis * (2 * 9 * w * w + 4 * w + 1) for w in widths)
    stitches = sum(2 * a + 9 * a * b + 2 * b + 9 * b * b + a * b for a, b in zip(widths[:-1], widths[1:]))
    head = 2 * widths[-1] + widths[-1] * num_classes + num_classes
    return stem + stages + stitches + head


def test_parameter_count_and_refinement_report() -> None:
    model = get_model("cnet_cifar", scheme="rk4", n_steps=2)
    count = sum(p.numel() for p in model.parameters())
    assert count == _hand_count((16, 32, 64), 2, 3, 10) == 267_616
    change = model.refine()
    assert (change.parameters_before, change.parameters_after) == (267_616, _hand_count((16, 32, 64), 4, 3, 10))
    assert str(change) == "n_basis 2-2-2 -> 4-4-4, n_steps 2-2-2 -> 4-4-4, parameters 267,616 -> 462,054"
    stage_parameters = {id(p) for stage in model.stages for p in stage.parameters()}
    assert {id(new) for layer in change.parameter_changes for new in layer.new} == stage_parameters


# ---------------------------------------------------------------------- gradients
def test_every_parameter_gets_a_gradient() -> None:
    model = _tiny(scheme="rk4", n_steps=2, skip_init=False, unit_kwargs={"bias": True})
    model(torch.randn(3, 2, 8, 8)).logsumexp(dim=1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_skip_init_gates_receive_gradients_while_the_gated_units_do_not() -> None:
    """With every gate at zero the residual units do not touch the output (so their weights get zero
    gradients) but the gates do: d(output)/d(gate) = the unit's output."""
    model = _tiny(scheme="midpoint", n_steps=2, skip_init=True)
    model(torch.randn(3, 2, 8, 8)).logsumexp(dim=1).sum().backward()
    for name, parameter in model.named_parameters():
        inside_unit = name.startswith("stages.") and ".gate." not in name
        if inside_unit:
            assert torch.count_nonzero(parameter.grad) == 0, name
        else:
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("basis", ["piecewise_constant", "piecewise_linear"])
def test_checkpointed_steps_give_the_same_training_step(randomize, basis: str) -> None:
    kwargs = dict(scheme="rk4", n_steps=3, n_basis=2, basis=basis)
    plain = randomize(_tiny(**kwargs)).double()
    checkpointed = _tiny(**kwargs, recompute_steps=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    outputs = [model(x) for model in (plain, checkpointed)]
    for output in outputs:
        output.logsumexp(dim=1).sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)
    for (name, ours), theirs in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=0, msg=name)
    for (name, ours), theirs in zip(checkpointed.named_buffers(), plain.buffers()):
        torch.testing.assert_close(ours, theirs, atol=1e-14, rtol=0, msg=name)


# ---------------------------------------------------------------------- backbone surface
def test_backbone_methods_agree_with_the_stage_features() -> None:
    model = _tiny(scheme="heun", n_steps=2).eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        stages = model.forward_stages(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        full = model(x)
    assert [info["num_chs"] for info in model.feature_info] == [f.shape[1] for f in stages] == list(WIDTHS)
    assert [info["reduction"] for info in model.feature_info] == [8 // f.shape[-1] for f in stages] == [1, 2]
    assert [info["module"] for info in model.feature_info] == ["stages.0", "stages.1"]
    assert model.num_features == WIDTHS[-1] == features.shape[1]
    torch.testing.assert_close(features, F.relu(model.norm(stages[-1])))
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, pooled @ model.fc.weight.T + model.fc.bias)
    torch.testing.assert_close(full, logits)
    assert model.get_classifier() is model.fc

    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled)
    with pytest.raises(ValueError, match="num_classes=-1 must be an integer >= 0"):
        model.reset_classifier(-1)


def test_torchvision_feature_extractor_and_fx_trace() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _tiny(scheme="rk4", n_steps=2, skip_init=False).eval()
    x = torch.randn(2, 2, 8, 8)
    extractor = create_feature_extractor(model, {info["module"]: info["module"] for info in model.feature_info})
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model.forward_stages(x)
        extracted = extractor(x)
        torch.testing.assert_close(traced(x), model(x), atol=0, rtol=0)
    for info, feature in zip(model.feature_info, expected):
        torch.testing.assert_close(extracted[info["module"]], feature, atol=0, rtol=0)


def test_torch_compile_matches_eager() -> None:
    """Dynamo must capture the whole model in one graph (static loops, Python-float time). The aot_eager
    backend keeps this fast; inductor code generation is torch's own business."""
    model = _tiny(scheme="midpoint", n_steps=2, skip_init=False).eval()
    x = torch.randn(2, 2, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-6)


def test_registry_and_builders() -> None:
    assert list_models() == ["cnet_cifar", "cnet_cifar_wide", "cnet_digits"]
    assert list_models("cnet_cifar*") == ["cnet_cifar", "cnet_cifar_wide"]
    digits = get_model("cnet_digits", n_steps=2)
    assert digits.stem.in_channels == 1 and [s.unit.norm1.num_features for s in digits.stages] == [8, 16, 32]
    assert get_model("cnet_cifar_wide").num_classes == 100
    with pytest.raises(ValueError, match=r"model='resnet50' is not known: expected one of \['cnet_cifar', "):
        get_model("resnet50")
    with pytest.raises(ValueError, match="weights='DEFAULT'.*expected weights=None"):
        get_model("cnet_cifar", weights="DEFAULT")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(widths=()), "widths=.* must be a non-empty list of positive integers"),
    (dict(widths=(4, 0)), "widths=.* must be a non-empty list of positive integers"),
    (dict(num_classes=-2), "num_classes=-2 must be an integer >= 0"),
    (dict(n_steps=(1, 2, 3)), r"n_steps=\(1, 2, 3\) must be one value or 2 values \(one per stage\)"),
    (dict(scheme="rk9"), "scheme='rk9' is not known"),
    (dict(basis="piecewise_linear", n_steps=1), "n_basis=1 is not valid for the 'piecewise_linear' basis"),
])
def test_invalid_construction_is_rejected(kwargs: dict, message: str) -> None:
    widths = kwargs.pop("widths", WIDTHS)
    with pytest.raises(ValueError, match=message):
        ContinuousNet(widths, **kwargs)


# ---------------------------------------------------------------------- manifestation
def test_manifestation_is_temporary_and_restored_on_error() -> None:
    model = _tiny(scheme="euler", n_steps=(2, 3))
    with model.manifestation(scheme="rk4", n_steps=(4, 1)) as inside:
        assert inside is model
        assert [(r.scheme, r.n_steps) for r in model.resolution] == [("rk4", 4), ("rk4", 1)]
        assert model.function_evaluations == 20
    assert [(r.scheme, r.n_steps) for r in model.resolution] == [("euler", 2), ("euler", 3)]
    with pytest.raises(RuntimeError, match="boom"):
        with model.manifestation(scheme="heun"):
            raise RuntimeError("boom")
    assert [(r.scheme, r.n_steps) for r in model.resolution] == [("euler", 2), ("euler", 3)]
    model.set_manifestation(n_steps=6)
    assert [(r.scheme, r.n_steps, r.n_basis, r.T) for r in model.resolution] == [
        ("euler", 6, 2, 2.0), ("euler", 6, 3, 3.0)
    ]


def test_manifestation_restores_an_unregistered_tableau() -> None:
    ralston = make_tableau("ralston_unregistered", a=[[0, 0], [2 / 3, 0]], b=[1 / 4, 3 / 4], order=2)
    model = _tiny(n_steps=2)
    model.set_manifestation(scheme=ralston)
    with model.manifestation(scheme="rk4", n_steps=4):
        assert model.resolution[0].scheme == "rk4"
    assert all(stage.tableau is ralston and stage.n_steps == 2 for stage in model.stages)


@pytest.mark.parametrize(("request_", "message"), [
    (dict(scheme="rk5"), r"scheme='rk5' is not known: expected one of \["),
    (dict(n_steps=0), r"n_steps=0 is not valid: expected an integer >= 1"),
    (dict(n_steps=2.5), r"n_steps=2.5 is not valid: expected an integer >= 1"),
    (dict(n_steps=(4, 0)), r"n_steps=0 is not valid"),
    (dict(n_steps=(4, 4, 4)), r"n_steps=\(4, 4, 4\) must be one value or 2 values"),
    (dict(scheme="rk4", n_steps=[3]), r"n_steps=\[3\] must be one value or 2 values"),
])
def test_bad_manifestation_is_rejected_and_changes_nothing(request_: dict, message: str) -> None:
    model = _tiny(scheme="euler", n_steps=2)
    state, resolution = _state(model), model.resolution
    with pytest.raises(ValueError, match=message):
        model.set_manifestation(**request_)
    with pytest.raises(ValueError, match=message):
        with model.manifestation(**request_):
            pass
    assert model.resolution == resolution
    _assert_same_state(state, model)


@pytest.mark.parametrize(("basis", "request_", "message"), [
    ("piecewise_constant", dict(n_basis=8), r"n_basis=8 is finer than the current 4.*expected n_basis in \[1, 4\]"),
    ("piecewise_constant", dict(n_basis=(2, 8)), r"n_basis=8 is finer than the current 4"),
    ("piecewise_constant", dict(n_basis=(2, 2, 2)), r"n_basis=\(2, 2, 2\) must be one value or 2 values"),
    ("piecewise_constant", dict(n_basis=2, n_steps=(2, 0)), r"n_steps=0 is not valid"),
    ("piecewise_linear", dict(n_basis=1),
     r"n_basis=1 is not valid for the 'piecewise_linear' basis: expected an integer >= 2"),
])
def test_bad_compression_is_rejected_and_changes_nothing(basis: str, request_: dict, message: str) -> None:
    model = _tiny(n_steps=4, basis=basis)
    state, resolution = _state(model), model.resolution
    with pytest.raises(ValueError, match=message):
        model.compress(**request_)
    assert model.resolution == resolution
    _assert_same_state(state, model)


def test_compress_per_stage(randomize) -> None:
    model = randomize(_tiny(n_steps=4, scheme="rk4"))
    before = stacked_time_tensors(model)
    change = model.compress(n_basis=(2, 4), n_steps=(2, 3))
    after = stacked_time_tensors(model)
    assert [(r.n_basis, r.n_steps) for r in model.resolution] == [(2, 2), (4, 3)]
    for name in ("stages.0.unit.conv1.weight", "stages.0.unit.norm2.running_var"):
        expected = before[name].reshape(2, 2, *before[name].shape[1:]).mean(1)
        torch.testing.assert_close(after[name], expected, atol=1e-6, rtol=0)
    assert torch.equal(after["stages.1.unit.conv1.weight"], before["stages.1.unit.conv1.weight"])
    removed = 2 * (2 * 9 * 4 * 4 + 4 * 4 + 1)  # two coefficients of the first stage
    assert change.parameters_before - change.parameters_after == removed


# ---------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("basis", ["piecewise_constant", "piecewise_linear"])
def test_refined_model_state_dict_round_trips(randomize, basis: str) -> None:
    source = randomize(_tiny(scheme="rk4", n_steps=2, basis=basis))
    source.refine()
    source.refine()
    x = torch.randn(2, 2, 8, 8)
    expected = _eval_output(source, x)
    fine_basis = source.resolution[0].n_basis

    same = _tiny(n_steps=1, n_basis=fine_basis, basis=basis)
    same.load_state_dict(source.state_dict())
    assert same.resolution == source.resolution
    torch.testing.assert_close(_eval_output(same, x), expected, atol=0, rtol=0)

    coarse = _tiny(n_steps=2, basis=basis)
    coarse.load_state_dict(source.state_dict())
    assert coarse.resolution == source.resolution
    torch.testing.assert_close(_eval_output(coarse, x), expected, atol=0, rtol=0)
    # every tensor of the state dict is a tensor (safetensors-ready), and the loaded model holds its own tensors
    # only: exactly the parameters of a model built at the fine resolution
    assert all(isinstance(v, torch.Tensor) for v in source.state_dict().values())
    built = _tiny(n_steps=1, n_basis=fine_basis, basis=basis)
    assert [p.shape for p in coarse.parameters()] == [p.shape for p in built.parameters()]


def test_unreachable_checkpoint_is_rejected_before_any_stage_changes() -> None:
    checkpoint = _tiny(n_steps=(4, 3)).state_dict()  # stage 0 is reachable from 2, stage 1 is not
    model = _tiny(n_steps=2)
    state, resolution = _state(model), model.resolution
    with pytest.raises(ValueError, match=r"n_basis=3 cannot be loaded into a stage with n_basis=2"):
        model.load_state_dict(checkpoint)
    assert model.resolution == resolution
    _assert_same_state(state, model)


def test_loading_restores_the_manifestation_and_depth() -> None:
    source = _tiny(scheme="rk4_38", n_steps=(2, 3), T=(1.5, 0.5))
    target = _tiny(scheme="euler", n_steps=(2, 3))
    target.load_state_dict(source.state_dict())
    assert target.resolution == (
        StageResolution(2, 2, "rk4_38", "piecewise_constant", 1.5),
        StageResolution(3, 3, "rk4_38", "piecewise_constant", 0.5),
    )


# ---------------------------------------------------------------------- docstring examples
@pytest.mark.parametrize("module_name", ["bases", "integrators", "layers", "units", "ode_block", "models", "registry",
                                         "_transaction", "_namespace", "resolution", "adaptive", "legendre"])
def test_docstring_examples(monkeypatch: pytest.MonkeyPatch, module_name: str) -> None:
    for registry in (SCHEMES, BASES, MODELS, UNITS):  # what the examples register is dropped afterwards
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    module = importlib.import_module(f"lightning_cnet.{module_name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- tampered and foreign state dicts
def _tampered(key: str, value) -> dict:
    state = _tiny(n_steps=(4, 2)).state_dict()
    for stage in (0, 1):
        state[f"stages.{stage}.unit.conv1.weight.1"] = state[f"stages.{stage}.unit.conv1.weight.0"]
    state[f"stages.1.resolution.{key}"] = value
    return state


@pytest.mark.parametrize(("key", "value", "message"), [
    ("T", torch.tensor(-1.0, dtype=torch.float64), "T=-1.0: expected a finite positive"),
    ("T", torch.tensor(float("nan"), dtype=torch.float64), "T=nan: expected a finite positive"),
    ("n_steps", torch.tensor(0), "n_steps=0: expected an integer >= 1"),
    ("scheme", torch.tensor(list(b"bogus"), dtype=torch.uint8), "scheme='bogus', which is not registered"),
    ("basis", torch.tensor(list(b"piecewise_linear"), dtype=torch.uint8), "basis='piecewise_linear'"),
    ("n_steps", torch.tensor(2.5), "must be a one-element integer tensor"),
    ("scheme", torch.ones(2, 2), "must be a 1-D uint8 tensor"),
])
def test_a_tampered_resolution_is_refused_and_the_model_is_unchanged(key, value, message) -> None:
    """Stage 1's entry is bad while stage 0's (4 pieces) asks for a refinement: stage 0 must not be refined either."""
    state = _tampered(key, value)
    model = _tiny(n_steps=1)
    before, resolution = _state(model), model.resolution
    parameters = list(model.parameters())
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    assert model.resolution == resolution and all(a is b for a, b in zip(model.parameters(), parameters))
    _assert_same_state(before, model)


def test_a_foreign_state_dict_leaves_the_model_exactly_as_it_was() -> None:
    """A CIFAR model's refined weights into a digits model: the stages would refine, then the stem does not fit."""
    cifar = get_model("cnet_cifar", n_steps=1)
    cifar.refine()
    digits = get_model("cnet_digits", n_steps=1)
    before, resolution, parameters = _state(digits), digits.resolution, list(digits.parameters())
    with pytest.raises(RuntimeError, match="size mismatch"):
        digits.load_state_dict(cifar.state_dict())
    assert digits.resolution == resolution and [p.shape for p in digits.parameters()] == [p.shape for p in parameters]
    assert all(a is b for a, b in zip(digits.parameters(), parameters))
    _assert_same_state(before, digits)
