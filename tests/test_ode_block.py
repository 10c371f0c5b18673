"""The ODE block against a hand-written ResNet, hand computations, and the truncation error of its scheme."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from lightning_cnet.bases import get_basis
from lightning_cnet.integrators import get_scheme, list_schemes, register_scheme
from lightning_cnet.layers import TimeBatchNorm2d
from lightning_cnet.ode_block import ODEBlock, StageResolution, stage_plan

CONSTANT = get_basis("piecewise_constant")


def _time_tensors(block: ODEBlock) -> dict[str, torch.Tensor]:
    """Every tensor of the block that carries basis coefficients, detached copies by name."""
    return {
        name: tensor.detach().clone()
        for name, tensor in list(block.named_parameters()) + list(block.named_buffers())
    }


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items() if torch.is_tensor(value)}


def _assert_same_state(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = _state(module)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


# ---------------------------------------------------------------------- Euler == ResNet
@pytest.mark.parametrize(("skip_init", "bias"), [(False, False), (True, False), (False, True), (True, True)])
def test_euler_piecewise_constant_block_is_a_resnet_stage(resnet_stage_like, randomize, skip_init, bias) -> None:
    n = 3
    block = ODEBlock(4, n_basis=n, n_steps=n, T=n, scheme="euler", skip_init=skip_init, bias=bias).double()
    randomize(block)
    reference = resnet_stage_like(block)
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    weights = torch.randn(4, 4, 5, 5, dtype=torch.float64)

    block.train(), reference.train()
    ours, theirs = block(x), reference(x)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for k, unit in enumerate(reference):
        for mine, ref in ((block.norm1, unit.bn1), (block.norm2, unit.bn2)):
            torch.testing.assert_close(mine.running_mean[k], ref.running_mean, atol=1e-14, rtol=0)
            torch.testing.assert_close(mine.running_var[k], ref.running_var, atol=1e-14, rtol=0)
            torch.testing.assert_close(mine.weight.grad[k], ref.weight.grad, atol=1e-10, rtol=0)
        for mine, ref in ((block.conv1, unit.conv1), (block.conv2, unit.conv2)):
            torch.testing.assert_close(mine.weight.grad[k], ref.weight.grad, atol=1e-10, rtol=0)
            if bias:
                torch.testing.assert_close(mine.bias.grad[k], ref.bias.grad, atol=1e-10, rtol=0)
        if skip_init:
            torch.testing.assert_close(block.gate.gate.grad[k], unit.gate.grad, atol=1e-10, rtol=0)

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
            plan = stage_plan(CONSTANT, n, tableau, n)
            expected = tuple(tuple(((i, 1.0),) for _ in tableau.c) for i in range(n))
            assert plan == expected, (scheme, n)


@pytest.mark.parametrize(("n_basis", "n_steps"), [(1, 4), (2, 4), (3, 12), (4, 32), (5, 15)])
def test_a_step_inside_one_piece_reads_only_that_piece(all_schemes: list[str], n_basis: int, n_steps: int) -> None:
    for scheme in all_schemes:
        tableau = get_scheme(scheme)
        plan = stage_plan(CONSTANT, n_basis, tableau, n_steps)
        expected = tuple(tuple(((i * n_basis // n_steps, 1.0),) for _ in tableau.c) for i in range(n_steps))
        assert plan == expected, (scheme, n_basis, n_steps)


def test_forward_pass_reads_piece_i_in_every_stage_of_step_i(all_schemes: list[str]) -> None:
    """Piece k's first convolution outputs the constant k (zero kernel, bias k); a hook records what every
    evaluation of the right-hand side read, in order, in float32."""
    for scheme in all_schemes:
        stages = get_scheme(scheme).n_stages
        for n in range(1, 34):
            block = ODEBlock(1, n_basis=n, scheme=scheme, skip_init=False, bias=True).eval()
            with torch.no_grad():
                block.conv1.weight.zero_()
                block.conv1.bias.copy_(torch.arange(n, dtype=torch.float32)[:, None])
            read: list[float] = []
            block.conv1.register_forward_hook(lambda module, args, out: read.append(out.flatten()[0].item()))
            with torch.no_grad():
                block(torch.randn(1, 1, 1, 1))
            assert read == [float(i) for i in range(n) for _ in range(stages)], (scheme, n)


# ---------------------------------------------------------------------- refinement
@pytest.mark.parametrize(("basis", "n_basis"), [("piecewise_constant", 3), ("piecewise_linear", 3)])
def test_refinement_leaves_every_time_tensor_unchanged_as_a_function(randomize, basis: str, n_basis: int) -> None:
    block = randomize(ODEBlock(3, n_basis=n_basis, n_steps=2, scheme="rk4", basis=basis, T=1.5, bias=True))
    before = _time_tensors(block)
    old_parameters = dict(block.named_parameters())
    change = block.refine()
    after = _time_tensors(block)
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
    new_parameters = dict(block.named_parameters())
    assert {old: new for old, (new, _) in change.parameter_map.items()} == {
        old_parameters[name]: new_parameters[name] for name in old_parameters
    }


@pytest.mark.parametrize(("basis", "scheme", "order"), [
    ("piecewise_constant", "rk4", 4),
    ("piecewise_constant", "midpoint", 2),
    ("piecewise_linear", "rk4", 4),
])
def test_refinement_changes_the_output_only_by_the_truncation_error(basis: str, scheme: str, order: int) -> None:
    """With the BatchNorm shifts keeping every ReLU input positive, R is smooth in x, so halving the step
    must shrink the change of output by about 2^order."""
    block = ODEBlock(3, n_basis=4 if basis == "piecewise_constant" else 3, n_steps=4, scheme=scheme, basis=basis,
                     T=1.0, skip_init=False).double().eval()
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.2, 0.4)
            norm.bias.uniform_(2.5, 3.0)
            norm.running_mean.normal_(0.0, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
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
    assert changes[-1] < (1e-5 if order == 4 else 1e-3) * outputs[0].abs().max().item(), changes


def test_refinement_noise_perturbs_only_the_convolutions() -> None:
    block = ODEBlock(2, n_basis=1, n_steps=1)
    block.refine(noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(block.conv1.weight[0], block.conv1.weight[1])
    assert torch.equal(block.norm1.weight[0], block.norm1.weight[1])
    with pytest.raises(ValueError, match="noise_std=-1"):
        block.refine(noise_std=-1)


# ---------------------------------------------------------------------- piecewise linear basis
def test_piecewise_linear_block_matches_a_hand_computation(randomize) -> None:
    """K = 2 hats, midpoint with N = 2 steps: stages at t = 0, 1/4, 1/2, 3/4, where every parameter and
    running statistic is (1 - t) theta_0 + t theta_1."""
    block = randomize(ODEBlock(3, n_basis=2, n_steps=2, scheme="midpoint", basis="piecewise_linear", T=1.5,
                               bias=True)).double().eval()

    def at(tensor: torch.Tensor, t: float) -> torch.Tensor:
        return (1 - t) * tensor[0] + t * tensor[1]

    def rate(x: torch.Tensor, t: float) -> torch.Tensor:
        n1, c1, n2, c2 = block.norm1, block.conv1, block.norm2, block.conv2
        y = F.batch_norm(x, at(n1.running_mean, t), at(n1.running_var, t), at(n1.weight, t), at(n1.bias, t),
                         False, 0.0, n1.eps)
        y = F.conv2d(F.relu(y), at(c1.weight, t), at(c1.bias, t), padding=1)
        y = F.batch_norm(y, at(n2.running_mean, t), at(n2.running_var, t), at(n2.weight, t), at(n2.bias, t),
                         False, 0.0, n2.eps)
        y = F.conv2d(F.relu(y), at(c2.weight, t), at(c2.bias, t), padding=1)
        return at(block.gate.gate, t) * y

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
    initial_mean = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        norm.running_mean.copy_(initial_mean)
        norm.weight.uniform_(0.5, 1.5)
    old_mean, old_var = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    weights = ((0, 0.75), (1, 0.25))
    out = norm(x, weights)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=True)
    for index, share in weights:
        rate = 0.2 * share
        torch.testing.assert_close(norm.running_mean[index], (1 - rate) * old_mean[index] + rate * batch_mean)
        torch.testing.assert_close(norm.running_var[index], (1 - rate) * old_var[index] + rate * batch_var)
    scale = 0.75 * norm.weight[0] + 0.25 * norm.weight[1]
    shift = 0.75 * norm.bias[0] + 0.25 * norm.bias[1]
    biased_var = x.var(dim=(0, 2, 3), unbiased=False)
    expected = (x - batch_mean[:, None, None]) / torch.sqrt(biased_var[:, None, None] + norm.eps)
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
    plain = randomize(ODEBlock(3, n_basis=3, n_steps=4, scheme="rk4", basis=basis, bias=True)).double()
    checkpointed = ODEBlock(3, n_basis=3, n_steps=4, scheme="rk4", basis=basis, bias=True,
                            checkpoint_steps=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    initial_mean = plain.norm2.running_mean.clone()
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
    assert (checkpointed.norm2.running_mean - initial_mean).abs().min() > 0  # every coefficient was updated


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
    ("piecewise_linear", dict(n_basis=1), r"n_basis=1 is not valid for the 'piecewise_linear' basis: expected an integer >= 2"),
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
    block = randomize(ODEBlock(3, n_basis=n_from, n_steps=3, basis=basis, bias=True))
    before = _time_tensors(block)
    projection = get_basis(basis).projection_matrix(n_from, n_to)
    change = block.compress(n_basis=n_to)
    assert block.resolution == StageResolution(n_to, 3, "euler", basis, 3.0)
    assert change.before.n_basis == n_from and len(change.parameter_map) == len(before) - 4  # 4 buffers
    for name, tensor in _time_tensors(block).items():
        expected = torch.einsum("ij,j...->i...", projection, before[name].double()).float()
        if name.endswith("running_var"):
            expected = expected.clamp(min=1e-5)
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-6, msg=name)


def test_compress_piecewise_constant_halving_averages_pairs_of_pieces(randomize) -> None:
    block = randomize(ODEBlock(3, n_basis=4, n_steps=4, bias=True))
    before = _time_tensors(block)
    block.compress(n_basis=2)
    for name, tensor in _time_tensors(block).items():
        expected = before[name].reshape((2, 2) + before[name].shape[1:]).mean(dim=1)
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0, msg=name)


def test_compress_steps_only_changes_the_step_count(randomize) -> None:
    block = randomize(ODEBlock(3, n_basis=4, n_steps=4, scheme="rk4"))
    state = _state(block)
    change = block.compress(n_steps=2)
    assert block.resolution == StageResolution(4, 2, "rk4", "piecewise_constant", 4.0)
    assert change.parameter_map == {}
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
    assert same.resolution == source.resolution and same.load_refinements == []
    torch.testing.assert_close(_eval_output(same, x), expected, atol=0, rtol=0)

    coarse = ODEBlock(3, n_basis=2, n_steps=2, basis=basis)
    coarse.load_state_dict(source.state_dict())
    assert coarse.resolution == source.resolution
    assert [change.after.n_basis for change in coarse.load_refinements] == [
        get_basis(basis).refined_size(2), source.n_basis
    ]
    torch.testing.assert_close(_eval_output(coarse, x), expected, atol=0, rtol=0)


def test_unreachable_checkpoint_resolution_is_rejected_before_any_change() -> None:
    checkpoint = ODEBlock(3, n_basis=3, n_steps=3).state_dict()
    block = ODEBlock(3, n_basis=2, n_steps=2)
    state, resolution = _state(block), block.resolution
    with pytest.raises(ValueError, match=r"n_basis=3 cannot be loaded into a stage with n_basis=2.*build the model with n_basis=3"):
        block.load_state_dict(checkpoint)
    assert block.resolution == resolution
    _assert_same_state(state, block)
