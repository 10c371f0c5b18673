"""Resolution bounds: hostile state dicts are refused in milliseconds with the model unchanged, and step counts,
piece counts and refinements are estimated and refused (or warned about) before anything is built."""

from __future__ import annotations

import copy
import math
import time
import warnings

import pytest
import torch

from lightning_cnet import ContinuousNet, ODEBlock, cost, get_model
from lightning_cnet.cost import ResolutionCostError, ResolutionCostWarning, activation_bytes, estimate_cost

WIDTHS = (4, 8)


def _tiny(**kwargs) -> ContinuousNet:
    return ContinuousNet(WIDTHS, **{"in_chans": 1, "num_classes": 3, **kwargs})


def _snapshot(model: torch.nn.Module) -> tuple:
    state = {name: value.clone() for name, value in model.state_dict().items()}
    return state, model.resolution, list(model.parameters())


def _assert_unchanged(model: torch.nn.Module, snapshot: tuple) -> None:
    state, resolution, parameters = snapshot
    assert model.resolution == resolution
    assert all(a is b for a, b in zip(model.parameters(), parameters)) and len(list(model.parameters())) == len(
        parameters)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[key], state[key]) for key in state)


def _name(text: str | bytes) -> torch.Tensor:
    data = text.encode() if isinstance(text, str) else text
    return torch.tensor(list(data), dtype=torch.uint8)


# a state dict of a K = 4 model whose stage 1 claims something else
HOSTILE = {
    "n_basis_2**20": ("n_basis", torch.tensor(2**20), "claims n_basis=1048576 but stores 4"),
    "n_basis_8": ("n_basis", torch.tensor(8), "claims n_basis=8 but stores 4"),
    "n_steps_10**7": ("n_steps", torch.tensor(10**7), "n_steps=10000000 is too many steps per stage"),
    "T_1e300": ("T", torch.tensor(1e300, dtype=torch.float64), "T=1e+300 is not valid"),
    "T_nan": ("T", torch.tensor(math.nan, dtype=torch.float64), "T=nan: expected a finite positive"),
    "T_inf": ("T", torch.tensor(math.inf, dtype=torch.float64), "T=inf: expected a finite positive"),
    "scheme_junk_bytes": ("scheme", _name(bytes([0xff, 0xfe, 0x00, 0x80] * 4)), "does not hold a UTF-8 name"),
    "scheme_unregistered": ("scheme", _name("rk99"), "scheme='rk99', which is not registered"),
    "scheme_huge": ("scheme", torch.zeros(10**7, dtype=torch.uint8), "holds 10000000 bytes"),
    "basis_junk": ("basis", _name("\x00junk"), "uses basis='\\x00junk'"),
}


@pytest.fixture(scope="module")
def refined_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return _tiny(n_steps=4).state_dict()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_resolution_is_refused_in_milliseconds_and_the_model_is_unchanged(case, refined_state) -> None:
    key, value, message = HOSTILE[case]
    state = {**refined_state, f"stages.1.resolution.{key}": value}
    model = _tiny(n_steps=1)
    before = _snapshot(model)
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    elapsed = time.perf_counter() - start
    assert message in str(error.value) and "\n" not in str(error.value)
    assert elapsed < 0.5, f"refusing took {elapsed:.2f} s"
    _assert_unchanged(model, before)


def test_pieces_that_are_not_0_to_k_minus_1_are_refused(refined_state) -> None:
    """Four pieces stored under the indices 0, 1, 2 and 2**20 - 1 do not make a 2**20-piece stage."""
    state = dict(refined_state)
    for name in [key for key in state if key.startswith("stages.1.") and ".3" in key.split("stages.1.")[1]]:
        state[name.replace(".3", f".{2**20 - 1}", 1)] = state.pop(name)
    state["stages.1.resolution.n_basis"] = torch.tensor(2**20)
    model = _tiny(n_steps=1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"stores pieces 0-2, 1048575 for stages.1.unit"):
        model.load_state_dict(state)
    _assert_unchanged(model, before)


def test_a_claim_without_any_stored_piece_is_refused() -> None:
    state = {key: value for key, value in _tiny(n_steps=2).state_dict().items()
             if not key.startswith("stages.1.") or ".resolution." in key}
    state["stages.1.resolution.n_basis"] = torch.tensor(2**20)
    model = _tiny(n_steps=1)
    with pytest.raises(ValueError, match="claims n_basis=1048576 but stores none of the stage's weight pieces"):
        model.load_state_dict(state, strict=False)


def test_a_hostile_safetensors_file_is_refused(tmp_path, refined_state) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file({**refined_state, "stages.0.resolution.n_basis": torch.tensor(2**20)}, str(path))
    model = _tiny(n_steps=1)
    before = _snapshot(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="claims n_basis=1048576 but stores 4"):
        model.load_state_dict(safetensors.load_file(str(path)))
    assert time.perf_counter() - start < 0.5
    _assert_unchanged(model, before)


def test_the_other_model_check_of_a_lightning_load_is_cheap_too(refined_state) -> None:
    """``check_checkpoint`` loads the checkpoint into a deep copy of the task's model: a hostile claim must make the
    copy refuse as cheaply as the model itself (no refinement to 2**20 pieces on the copy)."""
    from lightning_cnet.module import ContinuousNetClassifier
    from lightning_cnet.task import check_checkpoint

    task = ContinuousNetClassifier("cnet_digits", n_steps=1)
    honest = ContinuousNetClassifier("cnet_digits", n_steps=4).state_dict()
    for key, value in (("n_basis", torch.tensor(2**20)), ("n_steps", torch.tensor(10**7)),
                       ("T", torch.tensor(1e300, dtype=torch.float64))):
        checkpoint = {"state_dict": {**honest, f"model.stages.2.resolution.{key}": value},
                      "hyper_parameters": dict(task.hparams)}
        before = _snapshot(task.model)
        start = time.perf_counter()
        with pytest.raises(ValueError, match="the checkpoint holds another model: the checkpoint's stage stages.2"):
            check_checkpoint(task, checkpoint)
        assert time.perf_counter() - start < 1.0
        _assert_unchanged(task.model, before)


# ---------------------------------------------------------------------- building and manifestation
def test_a_huge_step_count_is_refused_before_anything_is_built() -> None:
    start = time.perf_counter()
    with pytest.raises(ResolutionCostError, match="n_steps=100000 is too many steps per stage: expected at most 65536"):
        get_model("cnet_digits", n_steps=100_000)
    with pytest.raises(ResolutionCostError, match=r"n_basis=5000 \(n_basis defaults to n_steps\) is too many weight "
                                                  r"pieces per stage: expected at most 4096"):
        get_model("cnet_digits", n_steps=5000)
    with pytest.raises(ValueError, match=r"T=1e\+300 is not valid: expected a physical depth of at most 1e\+06"):
        get_model("cnet_digits", T=1e300)
    assert time.perf_counter() - start < 0.5


def test_a_model_that_does_not_fit_in_memory_is_refused_and_the_hint_fits(monkeypatch) -> None:
    """With 60 MB available, 500 pieces of cnet_cifar (373 KB each for the three stages) cannot fit; the suggested
    count is built without complaint under the same limit."""
    monkeypatch.setattr(cost, "available_memory", lambda device=None: 60 * 2**20)
    with pytest.raises(ResolutionCostError) as error:
        get_model("cnet_cifar", n_steps=500)
    message = str(error.value)
    assert message.startswith("n_steps=500 does not fit in memory: about ") and "60.0 MB available on cpu" in message
    suggested = int(message.split("; n_steps=", 1)[1].split()[0])
    piece = sum(p.numel() * 4 for p in get_model("cnet_cifar", n_steps=1).stages.parameters()) + sum(
        b.numel() * 4 for stage in get_model("cnet_cifar", n_steps=1).stages for name, b in stage.named_buffers()
        if "running" in name)
    assert 500 * piece > 0.9 * 60 * 2**20 >= suggested * piece  # by hand: the refusal and the hint are right
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_model("cnet_cifar", n_steps=suggested).resolution[0].n_basis == suggested


def test_a_huge_manifestation_is_refused_and_a_slow_one_warns() -> None:
    model = _tiny(n_steps=2)
    before = _snapshot(model)
    with pytest.raises(ResolutionCostError, match="n_steps=1000000 is too many steps per stage"):
        model.set_manifestation(n_steps=1_000_000)
    with pytest.raises(ResolutionCostError):
        with model.manifestation(n_steps=[1, 1_000_000]):
            pass
    _assert_unchanged(model, before)
    with pytest.warns(ResolutionCostWarning, match=r"evaluates the residual unit 16384 times \(8192 in one stage"):
        model.set_manifestation(scheme="rk4", n_steps=2048)
    assert model.function_evaluations == 16384


def test_a_refinement_beyond_the_bound_is_refused_before_any_stage_changes(monkeypatch) -> None:
    monkeypatch.setattr(cost, "MAX_STEPS_PER_STAGE", 8)
    model = _tiny(n_steps=[2, 8])
    before = _snapshot(model)
    with pytest.raises(ResolutionCostError, match="n_steps=16 is too many steps per stage: expected at most 8"):
        model.refine()
    _assert_unchanged(model, before)
    block = ODEBlock(4, n_basis=8)
    with pytest.raises(ResolutionCostError, match="n_steps after refinement=16"):
        block.refine()
    assert block.n_basis == 8


# ---------------------------------------------------------------------- the estimate against the truth
def test_the_estimate_after_refinements_matches_refining_a_copy() -> None:
    for basis in ("piecewise_constant", "piecewise_linear"):
        model = _tiny(n_steps=2, scheme="rk4", basis=basis)
        estimate = estimate_cost(model, refinements=2)
        refined = copy.deepcopy(model)
        refined.refine()
        refined.refine()
        truth = sum(t.numel() * t.element_size() for t in [*refined.parameters(), *refined.buffers()])
        counters = sum(b.numel() * b.element_size() for name, b in refined.named_buffers()
                       if name.endswith("num_batches_tracked"))
        assert [s.n_basis for s in estimate.stages] == [r.n_basis for r in refined.resolution]
        assert [s.n_steps for s in estimate.stages] == [r.n_steps for r in refined.resolution]
        assert estimate.function_evaluations == refined.function_evaluations
        # the estimate leaves out the per-piece BatchNorm batch counters (8 bytes each)
        assert estimate.parameter_bytes == pytest.approx(truth - counters, abs=64)


def _saved_by_a_training_pass(model: torch.nn.Module, batch: torch.Tensor) -> int:
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in own:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    return sum(storages.values())


@pytest.mark.parametrize(("scheme", "basis"), [("euler", "piecewise_constant"), ("rk4", "piecewise_linear")])
def test_activation_estimate_from_small_passes_matches_a_measured_large_pass(scheme, basis) -> None:
    """Four passes at 1-2 samples and 1-2 steps predict what a pass at 12 samples and 6 steps saves; measured
    directly (with the statistics of the measured pass restored afterwards), the two agree."""
    model = _tiny(n_steps=2, scheme=scheme, basis=basis).train()
    before = _snapshot(model)
    estimate = activation_bytes(model, (12, 1, 8, 8), n_steps=6)
    _assert_unchanged(model, before)  # no statistic moved, manifestation restored
    assert model.training
    with model.manifestation(n_steps=6):
        measured = _saved_by_a_training_pass(copy.deepcopy(model), torch.randn(12, 1, 8, 8))
    assert estimate == pytest.approx(measured, rel=0.02)
    assert estimate_cost(model, n_steps=6, batch_shape=(12, 1, 8, 8), training=True).activation_bytes == estimate


def test_a_refinement_schedule_beyond_the_bounds_is_refused_at_setup() -> None:
    """29 refinements of a one-step model would reach 2**29 steps per stage: refused before the first step."""
    import pytorch_lightning as pl
    from refinement_support import TinyDigits, trainer_options

    from lightning_cnet.callbacks import DepthRefinementCallback
    from lightning_cnet.module import ContinuousNetClassifier

    task = ContinuousNetClassifier("cnet_digits", n_steps=1)
    before = _snapshot(task.model)
    trainer = pl.Trainer(**trainer_options(max_epochs=30, callbacks=[DepthRefinementCallback(list(range(29)))]))
    with pytest.raises(ResolutionCostError, match=r"29 refinement\(s\) ahead \(to n_steps 536870912-536870912-"
                                                   r"536870912, training\): n_steps=536870912 is too many steps"):
        trainer.fit(task, datamodule=TinyDigits())
    assert trainer.global_step == 0
    _assert_unchanged(task.model, before)
