"""``ContinuousNetClassifier(compile=...)``: the option's checks, a compiled task trained through a depth refinement
against the same task trained eagerly, and the compiled code's cache across refinements."""

from __future__ import annotations

import copy
import pickle

import pytest
import pytorch_lightning as pl
import torch
from refinement_support import TinyDigits, make_task, n_steps, trainer_options

from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.models import get_model
from lightning_cnet.task import CompiledBackbone, _call_backbone, compile_options


def cache_entries() -> int:
    """Graphs TorchDynamo keeps for the compiled backbone call."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(_call_backbone.__code__))


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_option_is_checked():
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune", "dynamic": False}) == {"mode": "max-autotune", "dynamic": False}
    with pytest.raises(ValueError, match=r"compile='yes' is not valid: expected True, False or a dict"):
        make_task(compile="yes")
    with pytest.raises(ValueError, match=r"keys torch.compile does not take: bogus, fullgrph; expected .*fullgraph"):
        make_task(compile={"fullgrph": True, "bogus": 1})


def test_compile_is_off_by_default_and_on_after_setup():
    eager, compiled = make_task(), make_task(compile={"backend": "eager"})
    trainer = pl.Trainer(**trainer_options(max_epochs=1, limit_train_batches=1, limit_val_batches=0))
    trainer.fit(eager, datamodule=TinyDigits())
    assert eager._compiled_backbone is None and eager.hparams.compile is False
    assert compiled._compiled_backbone is None, "compiled at setup, not at construction"
    trainer = pl.Trainer(**trainer_options(max_epochs=1, limit_train_batches=1, limit_val_batches=0))
    trainer.fit(compiled, datamodule=TinyDigits())
    assert isinstance(compiled._compiled_backbone, CompiledBackbone) and cache_entries() >= 1


def twin_tasks(compile):
    """The same midpoint task built twice from one seed, eager and compiled."""
    tasks = []
    for options in (False, compile):
        torch.manual_seed(0)
        tasks.append(make_task(scheme="midpoint", compile=options))
    for key, value in tasks[0].state_dict().items():
        assert torch.equal(value, tasks[1].state_dict()[key])
    return tasks


def train(task, epochs: int = 2) -> None:
    callback = DepthRefinementCallback([1], evaluate=False, verbose=False)
    trainer = pl.Trainer(**trainer_options(callbacks=[callback], max_epochs=epochs, limit_train_batches=2,
                                           limit_val_batches=0))
    trainer.fit(task, datamodule=TinyDigits())


def assert_trained_alike(compiled, eager, rtol: float, atol: float) -> None:
    assert n_steps(compiled) == n_steps(eager) == [2, 2, 2]
    ours, theirs = compiled.state_dict(), eager.state_dict()
    assert ours.keys() == theirs.keys(), "compiling leaves the state dict's keys alone"
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=rtol, atol=atol, msg=key)
    images = torch.randn(6, 1, 8, 8)
    compiled.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), rtol=rtol, atol=atol)


def test_compiled_task_trains_through_a_refinement_like_eager():
    """Dynamo and AOTAutograd (the ``aot_eager`` backend: traced and differentiated, run without code generation)."""
    eager, compiled = twin_tasks({"backend": "aot_eager"})
    train(eager)
    train(compiled)
    assert_trained_alike(compiled, eager, rtol=1e-5, atol=1e-6)
    # one training graph per resolution (every batch has 32 images) and the evaluation graph of the comparison;
    # none kept for the replaced parameters
    assert unique_graphs() == 3
    assert cache_entries() == 2


@pytest.mark.slow
def test_compiled_task_with_inductor_trains_through_a_refinement_like_eager():
    eager, compiled = twin_tasks(True)
    train(eager)
    train(compiled)
    assert_trained_alike(compiled, eager, rtol=1e-4, atol=1e-5)
    assert unique_graphs() == 3 and cache_entries() == 2


def test_refinement_drops_the_graphs_of_replaced_parameters():
    """Without dropping them, train/eval graphs of every resolution pile up until Dynamo's recompile limit (8) makes
    the backbone run eagerly; here each refinement costs one compilation per mode and the cache stays small."""
    net = get_model("cnet_digits", scheme="midpoint", n_steps=1)
    compiled = CompiledBackbone({"backend": "eager", "dynamic": False})
    graphs = []
    for level in range(3):
        if level:
            net.refine()
        for training in (True, False):
            net.train(training)
            with torch.set_grad_enabled(training):
                compiled(net, torch.randn(8, 1, 8, 8))
        graphs.append(unique_graphs())
        assert cache_entries() == 2
    assert graphs == [2, 4, 6]
    net.eval()
    with torch.no_grad():
        with net.manifestation(n_steps=1):  # another manifestation of the same parameters: compiled once, kept
            compiled(net, torch.randn(8, 1, 8, 8))
        compiled(net, torch.randn(8, 1, 8, 8))
    assert unique_graphs() == 7 and cache_entries() == 3


def test_copies_of_a_compiled_task_run_their_own_weights():
    """Weight-averaging callbacks deep-copy the task and ``ddp_spawn`` pickles it: a copy runs its own backbone."""
    task = make_task(compile={"backend": "eager"})
    task._compiled_backbone = CompiledBackbone(task._compile_options)
    images = torch.randn(3, 1, 8, 8)
    for average in (copy.deepcopy(task), pickle.loads(pickle.dumps(task))):
        assert isinstance(average._compiled_backbone, CompiledBackbone)
        with torch.no_grad():
            for parameter in average.model.fc.parameters():
                parameter.zero_()
        task.eval(), average.eval()
        with torch.no_grad():
            assert torch.equal(average(images), torch.zeros(3, 10))
            assert not torch.equal(task(images), torch.zeros(3, 10))


def test_compiled_recomputation_matches_eager_steps():
    """``recompute_steps=True`` under compile: same output, gradients and BatchNorm statistics as storing every step."""
    torch.manual_seed(0)
    net = get_model("cnet_digits", scheme="midpoint", n_steps=2, recompute_steps=True)
    with torch.no_grad():
        for stage in net.stages:
            for piece in stage.gate.gate:
                piece.fill_(0.5)
    reference = copy.deepcopy(net)
    for stage in reference.stages:
        stage.recompute_steps = False
    images = torch.randn(4, 1, 8, 8)
    out = CompiledBackbone({"backend": "aot_eager"})(net, images)
    out.square().sum().backward()
    expected = reference(images)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, msg=name)
    for (name, ours), theirs in zip(net.named_buffers(), reference.buffers()):
        torch.testing.assert_close(ours, theirs, msg=name)
