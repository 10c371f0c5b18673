"""The ODE block against a hand-written ResNet, hand computations, and the truncation error of its scheme."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from conftest import stacked_time_tensors

from lightning_cnet.bases import get_basis
from lightning_cnet.integrators import get_scheme, list_schemes, register_scheme
from lightning_cnet.layers import TimeBatchNorm2d
from lightning_cnet.ode_block import ODEBlock, StageResolution, rk_stage_plan

CONSTANT = get_basis("piecewise_constant")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the state dict, without the stored resolution."""
    return {name: value.clone() for name, value in module.state_dict().items() if ".resolution." not in f".{name}"}


def _assert_same_state(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = _state(module)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


# ---------------------------------------------------------------------- Euler == ResNet
@pytest.mark.parametrize(("skip_init", "bias"), [(False, False), (True, False), (False, True), (True, True)])
def test_euler_piecewise_constant_block_is_a_resnet_stage(resnet_stage_like, randomize, skip_init, bias) -> None:
    n = 3
    block = ODEBlock(4, n_basis=n, n_steps=n, T=n, scheme="euler", skip_init=skip_init,
                     unit_kwargs={"bias": bias}).double()
    randomize(block)
    reference = resnet_stage_like(block)
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    weights = torch.randn(4, 4, 5, 5, dtype=torch.float64)

    block.train(), reference.train()
    ours, theirs = block(x), reference(x)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    unit = block.unit
    for k, ref_block in enumerate(reference):
        for mine, ref in ((unit.norm1.pieces[k], ref_block.bn1), (unit.norm2.pieces[k], ref_block.bn2)):
            torch.testing.assert_close(mine.running_mean, ref.running_mean, atol=1e-14, rtol=0)
            torch.testing.assert_close(mine.running_var, ref.running_var, atol=1e-14, rtol=0)
            torch.testing.assert_close(mine.weight.grad, ref.weight.grad, atol=1e-10, rtol=0)
        for mine, ref in ((unit.conv1, ref_block.conv1), (unit.conv2, ref_block.conv2)):
            torch.testing.assert_close(mine.weight[k].grad, ref.weight.grad, atol=1e-10, rtol=0)
            if bias:
                torch.testing.assert_close(mine.bias[k].grad, ref.bias.grad, atol=1e-10, rtol=0)
        if skip_init:
            torch.testing.assert_close(block.gate.gate[k].grad, ref_block.gate.grad, atol=1e-10, rtol=0)

    block.eval(), reference.eval()
    torch.testing.assert_close(block(x), reference(x), atol=1e-12, rtol=0)


def test_skip_init_block_starts_as_the_identity() -> None:
    block = ODEBlock(3, n_basis=2, n_steps=5, scheme="rk4", skip_init=True)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(block(x), x)


def test_default_depth_is_the_step_count() -> None:
    block = ODEBlock(2, n_basis=3, scheme="heun")
    assert block.resolution == StageResolution(n_basis=3, n_steps=3, scheme="heun", basis="piecewise_constant", T=3.0)
    assert block.function_evaluations == 6
    with pytest.raises(ValueError, match="T=0 is not valid"):
        ODEBlock(2, n_basis=1, T=0)


# ---------------------------------------------------------------------- open-interval rule
@pytest.fixture
def all_schemes(isolated_schemes: dict) -> list[str]:
    register_scheme("ralston", a=[[0, 0], [Fraction(2, 3), 0]], b=[Fraction(1, 4), Fraction(3, 4)], order=2)
    return list_schemes()


def test_every_stage_of_step_i_reads_piece_i_when_pieces_equal_steps(all_schemes: list[str]) -> None:
    for scheme in all_schemes:
        tableau = get_scheme(scheme)
        for n in range(1, 34):
            plan = rk_stage_plan(CONSTANT, n, tableau, n)
            expected = tuple(tuple(((i, 1.0),) for _ in tableau.c) for i in range(n))
            assert plan == expected, (scheme, n)


@pytest.mark.parametrize(("n_basis", "n_steps"), [(1, 4), (2, 4), (3, 12), (4, 32), (5, 15)])
def test_a_step_inside_one_piece_reads_only_that_piece(all_schemes: list[str], n_basis: int, n_steps: int) -> None:
    for scheme in all_schemes:
        tableau = get_scheme(scheme)
        plan = rk_stage_plan(CONSTANT, n_basis, tableau, n_steps)
        expected = tuple(tuple(((i * n_basis // n_steps, 1.0),) for _ in tableau.c) for i in range(n_steps))
        assert plan == expected, (scheme, n_basis, n_steps)


def test_forward_pass_reads_piece_i_in_every_stage_of_step_i(all_schemes: list[str]) -> None:
    """Piece k's first convolution outputs the constant k (zero kernel, bias k); a hook records what every
    evaluation of the right-hand side read, in order, in float32."""
    for scheme in all_schemes:
        stages = get_scheme(scheme).n_stages
        for n in range(1, 34):
            block = ODEBlock(1, n_basis=n, scheme=scheme, skip_init=False, unit_kwargs={"bias": True}).eval()
            with torch.no_grad():
                for k in range(n):
                    block.unit.conv1.weight[k].zero_()
                    block.unit.conv1.bias[k].fill_(float(k))
            read: list[float] = []
            block.unit.conv1.register_forward_hook(
                lambda module, args, out, read=read: read.append(out.flatten()[0].item()))
            with torch.no_grad():
                block(torch.randn(1, 1, 1, 1))
            assert read == [float(i) for i in range(n) for _ in range(stages)], (scheme, n)


# ---------------------------------------------------------------------- refinement
@pytest.mark.parametrize(("basis", "n_basis"), [("piecewise_constant", 3), ("piecewise_linear", 3)])
def test_refinement_leaves_every_time_tensor_unchanged_as_a_function(randomize, basis: str, n_basis: int) -> None:
    block = randomize(ODEBlock(3, n_basis=n_basis, n_steps=2, scheme="rk4", basis=basis, T=1.5,
                               unit_kwargs={"bias": True}))
    before = stacked_time_tensors(block)
    old_parameters = list(block.parameters())
    old_values = {id(p): p.detach().clone() for p in old_parameters}
    change = block.refine()
    after = stacked_time_tensors(block)
    refined = get_basis(basis).refined_size(n_basis)
    assert change.before.n_basis == n_basis and change.after == block.resolution
    assert block.resolution == StageResolution(refined, 4, "rk4", basis, 1.5)
    times = [i / 97 for i in range(98)] + [k / 6 for k in range(7)] + [0.25, 0.75]
    for name in before:
        assert after[name].shape == (refined,) + before[name].shape[1:], name
        for t in times:
            torch.testing.assert_close(
                block.basis.evaluate(after[name], t), block.basis.evaluate(before[name], t), atol=1e-6, rtol=1e-6
            )
    # every old parameter is accounted for once, every current parameter is new, and each new piece is the
    # combination of old pieces its sources name
    old_ids = [id(p) for c in change.parameter_changes for p in c.old]
    new_ids = [id(p) for c in change.parameter_changes for p in c.new]
    assert sorted(old_ids) == sorted(id(p) for p in old_parameters)
    assert sorted(new_ids) == sorted(id(p) for p in block.parameters())
    for layer_change in change.parameter_changes:
        for param in layer_change.new:
            combined = sum(old_values[id(source)] * c for source, c in layer_change.sources[param])
            torch.testing.assert_close(param.detach(), combined, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("basis", "scheme", "order"), [
    ("piecewise_constant", "rk4", 4),
    ("piecewise_constant", "midpoint", 2),
    ("piecewise_linear", "rk4", 4),
])
def test_refinement_changes_the_output_only_by_the_truncation_error(basis: str, scheme: str, order: int) -> None:
    """With the BatchNorm shifts keeping every ReLU input positive (and kernels halved, so the second BatchNorm's
    input stays in range), R is smooth in x, so halving the step must shrink the change of output by about 2^order."""
    block = ODEBlock(3, n_basis=4 if basis == "piecewise_constant" else 3, n_steps=4, scheme=scheme, basis=basis,
                     T=1.0, skip_init=False).double().eval()
    with torch.no_grad():
        for norm in (*block.unit.norm1.pieces, *block.unit.norm2.pieces):
            norm.weight.uniform_(0.2, 0.4)
            norm.bias.uniform_(2.5, 3.0)
            norm.running_mean.normal_(0.0, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
        for conv in (block.unit.conv1, block.unit.conv2):
            for kernel in conv.weight:
                kernel.mul_(0.5)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        outputs = [block(x)]
        for _ in range(3):
            block.refine()
            outputs.append(block(x))
    changes = [(b - a).abs().max().item() for a, b in zip(outputs[:-1], outputs[1:])]
    assert block.n_steps == 32
    for coarse, fine in zip(changes[:-1], changes[1:]):
        assert coarse / fine > 0.6 * 2**order, changes
    assert changes[-1] < (1e-6 if order == 4 else 1e-5) * outputs[0].abs().max().item(), changes


def test_refinement_noise_perturbs_only_the_convolutions() -> None:
    block = ODEBlock(2, n_basis=1, n_steps=1)
    block.refine(noise_std=0.1, generator=torch.Generator().manual_seed(0))
    unit = block.unit
    assert not torch.equal(unit.conv1.weight[0], unit.conv1.weight[1])
    assert not torch.equal(unit.conv2.weight[0], unit.conv2.weight[1])
    assert torch.equal(unit.norm1.pieces[0].weight, unit.norm1.pieces[1].weight)
    assert torch.equal(block.gate.gate[0], block.gate.gate[1])
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"noise_std={bad}"):
            block.refine(noise_std=bad)
    assert block.n_basis == 2


# ---------------------------------------------------------------------- piecewise linear basis
def test_piecewise_linear_block_matches_a_hand_computation(randomize) -> None:
    """K = 2 hats, midpoint with N = 2 steps: stages at t = 0, 1/4, 1/2, 3/4, where every parameter and
    running statistic is (1 - t) theta_0 + t theta_1."""
    block = randomize(ODEBlock(3, n_basis=2, n_steps=2, scheme="midpoint", basis="piecewise_linear", T=1.5,
                               unit_kwargs={"bias": True})).double().eval()
    theta = stacked_time_tensors(block)
    eps = block.unit.norm1.pieces[0].eps

    def at(name: str, t: float) -> torch.Tensor:
        return (1 - t) * theta[name][0] + t * theta[name][1]

    def norm(x: torch.Tensor, name: str, t: float) -> torch.Tensor:
        return F.batch_norm(x, at(f"{name}.running_mean", t), at(f"{name}.running_var", t), at(f"{name}.weight", t),
                            at(f"{name}.bias", t), False, 0.0, eps)

    def rate(x: torch.Tensor, t: float) -> torch.Tensor:
        y = F.conv2d(F.relu(norm(x, "unit.norm1", t)), at("unit.conv1.weight", t), at("unit.conv1.bias", t), padding=1)
        y = F.conv2d(F.relu(norm(y, "unit.norm2", t)), at("unit.conv2.weight", t), at("unit.conv2.bias", t), padding=1)
        return at("gate.gate", t) * y

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    h = 1.5 / 2  # T / N
    expected = x
    for t in (0.0, 0.5):
        expected = expected + h * rate(expected + h / 2 * rate(expected, t), t + 0.25)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-12, rtol=0)


def test_time_batch_norm_mixes_statistics_between_nodes() -> None:
    """Training at a time between two nodes updates each node's statistics with the momentum times its
    weight, and normalises with the batch statistics and the interpolated affine."""
    norm = TimeBatchNorm2d(3, n_basis=2, momentum=0.2).double()
    with torch.no_grad():
        for piece in norm.pieces:
            piece.running_mean.normal_()
            piece.weight.uniform_(0.5, 1.5)
    old = stacked_time_tensors(norm)
    old_mean, old_var = old[".running_mean"], old[".running_var"]
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    weights = ((0, 0.75), (1, 0.25))
    out = norm(x, weights)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=True)
    for index, share in weights:
        rate = 0.2 * share
        piece = norm.pieces[index]
        torch.testing.assert_close(piece.running_mean, (1 - rate) * old_mean[index] + rate * batch_mean)
        torch.testing.assert_close(piece.running_var, (1 - rate) * old_var[index] + rate * batch_var)
    scale = 0.75 * old[".weight"][0] + 0.25 * old[".weight"][1]
    shift = 0.75 * old[".bias"][0] + 0.25 * old[".bias"][1]
    biased_var = x.var(dim=(0, 2, 3), unbiased=False)
    expected = (x - batch_mean[:, None, None]) / torch.sqrt(biased_var[:, None, None] + norm.pieces[0].eps)
    torch.testing.assert_close(out, expected * scale[:, None, None] + shift[:, None, None])


def test_piecewise_linear_block_trains() -> None:
    block = ODEBlock(3, n_basis=3, n_steps=4, scheme="rk4", basis="piecewise_linear", skip_init=False, T=1.0)
    x, target = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.mse_loss(block(x), target)
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------- checkpointed steps
@pytest.mark.parametrize("basis", ["piecewise_constant", "piecewise_linear"])
def test_checkpointed_steps_match_stored_steps(randomize, basis: str) -> None:
    """Same outputs, gradients and running statistics (updated once per forward, not again when a step is
    recomputed); rk4 with K = 3, N = 4 mixes single-coefficient and interpolated stages for the linear basis."""
    plain = randomize(ODEBlock(3, n_basis=3, n_steps=4, scheme="rk4", basis=basis, unit_kwargs={"bias": True})).double()
    checkpointed = ODEBlock(3, n_basis=3, n_steps=4, scheme="rk4", basis=basis, unit_kwargs={"bias": True},
                            recompute_steps=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    initial_mean = stacked_time_tensors(plain)["unit.norm2.running_mean"]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    weights = torch.randn_like(x)
    results = []
    for block in (plain, checkpointed):
        inputs = x.clone().requires_grad_()
        out = block(inputs)
        (out * weights).sum().backward()
        results.append((out.detach(), inputs.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-12, rtol=0)
    for (name, ours), theirs in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=0, msg=name)
    for (name, ours), theirs in zip(checkpointed.named_buffers(), plain.buffers()):
        torch.testing.assert_close(ours, theirs, atol=1e-14, rtol=0, msg=name)
    final_mean = stacked_time_tensors(checkpointed)["unit.norm2.running_mean"]
    assert (final_mean - initial_mean).abs().min() > 0  # every piece was updated


# ---------------------------------------------------------------------- manifestation
def test_set_manifestation_changes_only_the_integration(randomize) -> None:
    block = randomize(ODEBlock(3, n_basis=2, n_steps=2, scheme="euler"))
    state = _state(block)
    block.set_manifestation(scheme="rk4", n_steps=5)
    assert block.resolution == StageResolution(2, 5, "rk4", "piecewise_constant", 2.0)
    assert block.function_evaluations == 20
    _assert_same_state(state, block)


def test_manifestation_context_restores_even_on_error() -> None:
    block = ODEBlock(3, n_basis=2, n_steps=2, scheme="euler")
    x = torch.randn(1, 3, 4, 4)
    with block.manifestation(scheme="heun", n_steps=6) as inside:
        assert inside is block and block.resolution.scheme == "heun" and block.n_steps == 6
    assert (block.scheme, block.n_steps) == ("euler", 2)
    with pytest.raises(RuntimeError, match="boom"):
        with block.manifestation(n_steps=7):
            block(x)
            raise RuntimeError("boom")
    assert (block.scheme, block.n_steps, block.function_evaluations) == ("euler", 2, 2)


BAD_MANIFESTATIONS = [
    (dict(scheme="rk5"), r"scheme='rk5' is not known: expected one of \[.*'euler'"),
    (dict(n_steps=0), r"n_steps=0 is not valid: expected an integer >= 1"),
    (dict(n_steps=2.0), r"n_steps=2.0 is not valid: expected an integer >= 1"),
    (dict(n_steps=True), r"n_steps=True is not valid: expected an integer >= 1"),
    (dict(scheme="rk4", n_steps=-3), r"n_steps=-3 is not valid"),
]


@pytest.mark.parametrize(("request_", "message"), BAD_MANIFESTATIONS)
def test_bad_manifestation_is_rejected_and_changes_nothing(request_: dict, message: str) -> None:
    block = ODEBlock(3, n_basis=2, n_steps=2, scheme="euler")
    state, resolution = _state(block), block.resolution
    with pytest.raises(ValueError, match=message):
        block.set_manifestation(**request_)
    with pytest.raises(ValueError, match=message):
        with block.manifestation(**request_):
            pass
    assert block.resolution == resolution
    _assert_same_state(state, block)


BAD_COMPRESSIONS = [
    ("piecewise_constant", dict(n_basis=5), r"n_basis=5 is finer than the current 4.*expected n_basis in \[1, 4\]"),
    ("piecewise_constant", dict(n_basis=0), r"n_basis=0 is not valid.*expected an integer >= 1"),
    ("piecewise_constant", dict(n_basis=2.0), r"n_basis=2.0 is not valid"),
    ("piecewise_linear", dict(n_basis=1),
     r"n_basis=1 is not valid for the 'piecewise_linear' basis: expected an integer >= 2"),
    ("piecewise_constant", dict(n_basis=2, n_steps=0), r"n_steps=0 is not valid"),
]


@pytest.mark.parametrize(("basis", "request_", "message"), BAD_COMPRESSIONS)
def test_bad_compression_is_rejected_and_changes_nothing(basis: str, request_: dict, message: str) -> None:
    block = ODEBlock(3, n_basis=4, n_steps=4, basis=basis)
    state, resolution = _state(block), block.resolution
    with pytest.raises(ValueError, match=message):
        block.compress(**request_)
    assert block.resolution == resolution
    _assert_same_state(state, block)


@pytest.mark.parametrize(("basis", "n_from", "n_to"), [
    ("piecewise_constant", 6, 4),
    ("piecewise_linear", 5, 3),
    ("piecewise_linear", 6, 4),
])
def test_compress_projects_weights_and_statistics(randomize, basis: str, n_from: int, n_to: int) -> None:
    block = randomize(ODEBlock(3, n_basis=n_from, n_steps=3, basis=basis, unit_kwargs={"bias": True}))
    before = stacked_time_tensors(block)
    projection = get_basis(basis).projection_matrix(n_from, n_to)
    change = block.compress(n_basis=n_to)
    assert block.resolution == StageResolution(n_to, 3, "euler", basis, 3.0)
    assert change.before.n_basis == n_from
    assert sum(len(c.new) for c in change.parameter_changes) == len(list(block.parameters()))
    for name, tensor in stacked_time_tensors(block).items():
        expected = torch.einsum("ij,j...->i...", projection, before[name].double()).float()
        if name.endswith("running_var"):
            expected = expected.clamp(min=1e-5)
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-6, msg=name)


def test_compress_piecewise_constant_halving_averages_pairs_of_pieces(randomize) -> None:
    block = randomize(ODEBlock(3, n_basis=4, n_steps=4, unit_kwargs={"bias": True}))
    before = stacked_time_tensors(block)
    block.compress(n_basis=2)
    for name, tensor in stacked_time_tensors(block).items():
        expected = before[name].reshape((2, 2) + before[name].shape[1:]).mean(dim=1)
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0, msg=name)


def test_compress_steps_only_changes_the_step_count(randomize) -> None:
    block = randomize(ODEBlock(3, n_basis=4, n_steps=4, scheme="rk4"))
    state = _state(block)
    change = block.compress(n_steps=2)
    assert block.resolution == StageResolution(4, 2, "rk4", "piecewise_constant", 4.0)
    assert change.parameter_changes == ()
    _assert_same_state(state, block)


# ---------------------------------------------------------------------- state dicts
def _eval_output(block: ODEBlock, x: torch.Tensor) -> torch.Tensor:
    block.eval()
    with torch.no_grad():
        return block(x)


@pytest.mark.parametrize("basis", ["piecewise_constant", "piecewise_linear"])
def test_refined_block_loads_into_fresh_blocks(randomize, basis: str) -> None:
    source = randomize(ODEBlock(3, n_basis=2, n_steps=2, scheme="rk4", basis=basis))
    source.refine()
    source.refine()
    x = torch.randn(2, 3, 4, 4)
    expected = _eval_output(source, x)
    same = ODEBlock(3, n_basis=source.n_basis, n_steps=1, scheme="euler", basis=basis)
    same.load_state_dict(source.state_dict())
    assert same.resolution == source.resolution
    torch.testing.assert_close(_eval_output(same, x), expected, atol=0, rtol=0)

    coarse = ODEBlock(3, n_basis=2, n_steps=2, basis=basis)
    coarse.load_state_dict(source.state_dict())
    assert coarse.resolution == source.resolution
    # the loaded block holds its own tensors only: as many parameters as a block built at that resolution
    built = ODEBlock(3, n_basis=source.n_basis, basis=basis)
    assert [p.shape for p in coarse.parameters()] == [p.shape for p in built.parameters()]
    torch.testing.assert_close(_eval_output(coarse, x), expected, atol=0, rtol=0)


def test_unreachable_checkpoint_resolution_is_rejected_before_any_change() -> None:
    checkpoint = ODEBlock(3, n_basis=3, n_steps=3).state_dict()
    block = ODEBlock(3, n_basis=2, n_steps=2)
    state, resolution = _state(block), block.resolution
    with pytest.raises(ValueError,
                       match=r"n_basis=3 cannot be loaded into a stage with n_basis=2.*build the model with n_basis=3"):
        block.load_state_dict(checkpoint)
    assert block.resolution == resolution
    _assert_same_state(state, block)
