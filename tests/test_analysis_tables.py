"""The studies' tables against a direct, slow evaluation written here: a copy of the model per row, statistics
re-estimated on that copy, logits batch by batch with autograd on, cross-entropy by hand, and the fine reference
chosen by the documented convergence rule. The faster sweep must give the same rows and the same numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_cnet import get_model, recalibrate_bn
from lightning_cnet.analysis import as_batches, compression_sweep, manifestation_sweep

SCHEMES = ["euler", "midpoint", "rk4"]
STEPS = [1, 2, 3]
STAGES_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}


@pytest.fixture
def trained_like_model(randomize):
    return randomize(get_model("cnet_digits", n_steps=2, scheme="midpoint")).eval()


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(5)
    evaluation = as_batches([(torch.randn(12, 1, 8, 8, generator=generator),
                              torch.randint(0, 10, (12,), generator=generator)) for _ in range(3)])
    recalibration = [torch.randn(10, 1, 8, 8, generator=generator) for _ in range(4)]
    return evaluation, recalibration


def _slow(model, batches, *, scheme=None, n_steps=None, recalibration=None, off=False):
    """Logits, accuracy and mean cross-entropy of a fresh copy at one manifestation."""
    work = copy.deepcopy(model)
    if not off:
        work.set_manifestation(scheme=scheme, n_steps=n_steps)
    if recalibration is not None:
        recalibrate_bn(work, recalibration)
    work.eval()
    if off:
        for stage_index in range(len(work.stages)):
            work.stages[stage_index] = torch.nn.Identity()
    logits = [work(x) for x, _ in batches]
    targets = torch.cat([y for _, y in batches])
    joined = torch.cat(logits).detach()
    accuracy = (joined.argmax(-1) == targets).double().mean().item()
    log_probabilities = joined.double().log_softmax(-1)
    loss = -log_probabilities[torch.arange(len(targets)), targets].mean().item()
    return [t.detach() for t in logits], accuracy, loss


def _distance(values, reference):
    numerator = sum((v.double() - r.double()).square().sum().item() for v, r in zip(values, reference))
    return math.sqrt(numerator / sum(r.double().square().sum().item() for r in reference))


def _reference_by_the_rule(model, batches, largest, rtol, recalibration):
    """RK4 at 2M, 4M, ... (at most 16M): the first whose logits change by at most rtol from half as many steps."""
    previous = _slow(model, batches, scheme="rk4", n_steps=largest, recalibration=recalibration)[0]
    steps = largest
    while steps < 16 * largest:
        steps *= 2
        current = _slow(model, batches, scheme="rk4", n_steps=steps, recalibration=recalibration)[0]
        if _distance(previous, current) <= rtol:
            break
        previous = current
    return steps, current


def test_manifestation_table_equals_the_direct_evaluation(trained_like_model, data) -> None:
    batches, recalibration = data
    rtol = 1e-5
    state = {k: v.clone() for k, v in trained_like_model.state_dict().items()}
    rows = manifestation_sweep(trained_like_model, batches, schemes=SCHEMES, n_steps=STEPS, reference_rtol=rtol,
                               recalibration=recalibration, progress=False)
    after = trained_like_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items()), "the sweep must leave the model as it was"

    references = {mode: _reference_by_the_rule(trained_like_model, batches, max(STEPS), rtol,
                                               recalibration if mode == "recalibrated" else None)
                  for mode in ("as trained", "recalibrated")}
    assert references["as trained"][0] > 2 * max(STEPS), "the check must have gone past its first candidate"
    expected = [("stages_off", 0, "as trained")] + [(s, n, mode) for mode in ("as trained", "recalibrated")
                                                    for s in SCHEMES for n in STEPS]
    assert [(r["scheme"], r["n_steps"], r["bn"]) for r in rows] == expected
    for row in rows:
        mode = row["bn"]
        logits, accuracy, loss = _slow(trained_like_model, batches, scheme=row["scheme"], n_steps=row["n_steps"],
                                       recalibration=recalibration if mode == "recalibrated" else None,
                                       off=row["scheme"] == "stages_off")
        steps, reference = references[mode]
        label = (row["scheme"], row["n_steps"], mode)
        assert row["reference_steps"] == steps, label
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12), label
        assert row["loss"] == pytest.approx(loss, rel=1e-5), label
        assert row["logit_distance"] == pytest.approx(_distance(logits, reference), rel=1e-4, abs=1e-7), label
        assert row["trained"] == ((row["scheme"], row["n_steps"]) == ("midpoint", 2)), label
        if row["scheme"] != "stages_off":
            assert row["function_evaluations"] == 3 * row["n_steps"] * STAGES_PER_STEP[row["scheme"]], label


def test_a_reference_that_does_not_settle_stops_at_16_times_the_largest_count(trained_like_model, data) -> None:
    rows = manifestation_sweep(trained_like_model, data[0], schemes=["euler"], n_steps=[1], reference_rtol=1e-12,
                               progress=False)
    assert {row["reference_steps"] for row in rows} == {16}  # float32 logits never settle that far


def test_a_given_reference_step_count_is_used_as_given(trained_like_model, data) -> None:
    batches, _ = data
    rows = manifestation_sweep(trained_like_model, batches, schemes=["euler"], n_steps=[1, 2], reference_steps=5,
                               progress=False)
    reference = _slow(trained_like_model, batches, scheme="rk4", n_steps=5)[0]
    for row in rows[1:]:
        logits = _slow(trained_like_model, batches, scheme="euler", n_steps=row["n_steps"])[0]
        assert row["reference_steps"] == 5
        assert row["logit_distance"] == pytest.approx(_distance(logits, reference), rel=1e-4)


def test_bad_reference_tolerance_is_refused_before_any_work(trained_like_model, data) -> None:
    with pytest.raises(ValueError, match="reference_rtol=0 is not valid"):
        manifestation_sweep(trained_like_model, data[0], reference_rtol=0, progress=False)


def test_compression_table_equals_the_direct_evaluation(trained_like_model, data) -> None:
    batches, _ = data
    rows = compression_sweep(trained_like_model, batches, pairs=[(2, 2), (1, 3)], progress=False)
    off = _slow(trained_like_model, batches, off=True)
    assert rows[0]["accuracy"] == pytest.approx(off[1], abs=1e-12) and rows[0]["loss"] == pytest.approx(off[2])
    for row in rows[1:]:
        work = copy.deepcopy(trained_like_model)
        work.compress(n_basis=row["n_basis"], n_steps=row["n_steps"])
        _, accuracy, loss = _slow(work, batches, scheme=None, n_steps=None)
        assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["parameters"] == sum(p.numel() for p in work.parameters())


def test_cross_entropy_by_hand_is_torchs(data) -> None:
    """The hand cross-entropy of this file is torch's (so the comparisons above test the sweep, not the helper)."""
    logits = torch.randn(5, 10, dtype=torch.float64)
    targets = torch.tensor([0, 3, 9, 1, 1])
    by_hand = -logits.log_softmax(-1)[torch.arange(5), targets].mean().item()
    assert by_hand == pytest.approx(F.cross_entropy(logits, targets).item())


def test_convergence_table_equals_the_direct_evaluation(trained_like_model, data) -> None:
    """Each stage alone from the reference's input to it, the first stage included, in float64 by hand."""
    from lightning_cnet.analysis import convergence_study

    batches = data[0][:2]
    errors, _ = convergence_study(trained_like_model, batches, schemes=["euler", "rk4"], n_steps=[2, 3],
                                  reference_steps=12, progress=False)
    work = copy.deepcopy(trained_like_model).double().eval()
    images = [x.double() for x, _ in batches]
    stage_inputs: list[list[torch.Tensor]] = [[] for _ in work.stages]
    hooks = [stage.register_forward_pre_hook(lambda module, args, i=i: stage_inputs[i].append(args[0]))
             for i, stage in enumerate(work.stages)]
    with torch.no_grad(), work.manifestation(scheme="rk4", n_steps=12):
        reference = [work(x) for x in images]
        for hook in hooks:
            hook.remove()
        reference_stages = [[stage(x) for x in stage_inputs[i]] for i, stage in enumerate(work.stages)]
    by_key = {(r["scheme"], r["n_steps"], r["output"]): r["error"] for r in errors}
    assert len(by_key) == len(errors) == 2 * 2 * 4
    for scheme in ("euler", "rk4"):
        for steps in (2, 3):
            with torch.no_grad(), work.manifestation(scheme=scheme, n_steps=steps):
                logits = [work(x) for x in images]
                stages = [[stage(x) for x in stage_inputs[i]] for i, stage in enumerate(work.stages)]
            assert by_key[scheme, steps, "logits"] == pytest.approx(_distance(logits, reference), rel=1e-9)
            for i in range(len(work.stages)):
                assert by_key[scheme, steps, f"stage{i}"] == pytest.approx(
                    _distance(stages[i], reference_stages[i]), rel=1e-9), (scheme, steps, i)


# ---------------------------------------------------------------------- figures
@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, kept before they are saved."""
    from lightning_cnet.analysis import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda figure, path: (figures.append(figure), save(figure, path))[1])
    return figures


def _row(scheme, n, accuracy, bn="as trained"):
    return {"scheme": scheme, "n_steps": n, "bn": bn, "trained": (scheme, n) == ("rk4", 2), "accuracy": accuracy,
            "logit_distance": 0.1 / max(n, 1)}


def test_one_checkpoint_gets_a_colour_per_scheme_several_a_colour_per_checkpoint(tmp_path, drawn) -> None:
    from lightning_cnet.analysis.plots import plot_manifestation

    rows = [_row("stages_off", 0, 0.1)] + [_row(s, n, 0.8) for s in ("euler", "midpoint", "rk4") for n in (1, 2)]
    plot_manifestation({"run": rows}, tmp_path / "one.png")
    plot_manifestation({"a": rows, "b": rows}, tmp_path / "two.png")

    def colours_and_styles(figure):
        lines = [line for line in figure.axes[0].get_lines() if line.get_marker() == "."]  # the scheme curves
        return [(line.get_color(), line.get_linestyle()) for line in lines]

    one, two = colours_and_styles(drawn[0]), colours_and_styles(drawn[1])
    assert len(one) == 3 and len({c for c, _ in one}) == 3  # three schemes, three colours
    assert len(two) == 6 and len({c for c, _ in two}) == 2 and len({s for _, s in two}) == 3


def test_training_curve_has_whole_epoch_ticks_and_a_title(tmp_path, drawn) -> None:
    from lightning_cnet.analysis.plots import plot_training_curve

    plot_training_curve([(e, 0.5 + 0.02 * e) for e in range(4)], [1, 2], tmp_path / "c.png", metric="val_acc")
    axes = drawn[0].axes[0]
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert axes.get_title() == "val_acc by epoch"
