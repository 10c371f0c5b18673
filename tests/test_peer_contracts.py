"""What the libraries a ContinuousNet plugs into expect of a model or a callback, stated in our own words: timm's
model contract (the default configuration, ``features_only`` with a ``feature_cfg``), TorchScript directly and
through ``torch.fx``, ``torch.export`` and ONNX at any batch size, and Lightning's contract for several callbacks of
one kind in a Trainer (state keys, and checkpoints of 0.2.0 that keyed every instance by its class name)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from refinement_support import TinyDigits, make_task, n_steps, trainer_options
from test_timm import stage_maps

from lightning_cnet import ODEBlock, get_model, register_model, timm_support
from lightning_cnet.analysis.export import export_onnx, export_program
from lightning_cnet.callbacks import DepthRefinementCallback, ManifestationMonitor, NonFiniteGuard
from lightning_cnet.models import MODELS, ContinuousNet

timm = pytest.importorskip("timm")
from timm.models import FeatureGraphNet  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402

timm_support.register_timm_models()  # what a user does after importing timm

BUILDERS = ("cnet_cifar", "cnet_cifar_wide", "cnet_digits")


def scripted(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 marks torch.jit as deprecated
        return torch.jit.script(module)


# ---------------------------------------------------------------------- timm: the default configuration
@pytest.mark.parametrize("name", BUILDERS)
def test_default_cfg_gives_the_final_feature_map_of_the_default_input(name: str, randomize) -> None:
    model = randomize(timm.create_model(name)).eval()
    cfg = model.pretrained_cfg
    channels, *size = cfg["input_size"]
    assert cfg is model.default_cfg and len(cfg["mean"]) == len(cfg["std"]) == channels == model.in_chans
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert cfg["num_classes"] == model.num_classes

    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        final = model.forward_features(x)
        assert final.shape == (2, model.num_features, *cfg["pool_size"])  # measured, not computed from the cfg
        assert model.forward_head(final, pre_logits=True).shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).shape == final.shape
        unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == final.shape


def test_a_builder_without_configuration_gets_the_pool_size_of_its_input_size() -> None:
    names = {"cnet_peer_default": None, "cnet_peer_odd": {"input_size": (1, 13, 13)}}

    def builder(**kwargs):
        return ContinuousNet((4, 8, 8), **{"in_chans": 1, "num_classes": 3, **kwargs})

    for name in names:
        register_model(builder, name=name)
    try:
        timm_support.register_timm_models({name: cfg for name, cfg in names.items() if cfg})
        for name in names:
            model = timm.create_model(name).eval()
            input_size = model.pretrained_cfg["input_size"]
            with torch.no_grad():
                final = model.forward_features(torch.zeros(1, *input_size))
            assert tuple(final.shape[2:]) == model.pretrained_cfg["pool_size"], name
        assert timm.create_model("cnet_peer_odd").pretrained_cfg["pool_size"] == (4, 4)  # 13 -> 7 -> 4
    finally:
        from timm.models._registry import _clear_model_entries

        for name in names:
            _clear_model_entries(name)
            del MODELS._entries[name]
            timm_support._REGISTERED.discard(name)
            timm_support.default_cfgs.pop(name, None)
            delattr(timm_support, name)


# ---------------------------------------------------------------------- timm: features_only with a feature_cfg
def _features(name: str, full: ContinuousNet, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, features_only=True, **kwargs)`` holding the weights of ``full``."""
    wrapper = timm.create_model(name, features_only=True, **kwargs)
    if isinstance(wrapper, FeatureGetterNet):
        kept = wrapper.model.state_dict()
        wrapper.model.load_state_dict({key: value for key, value in full.state_dict().items() if key in kept})
    else:  # the graph shares the traced model's tensors, so copy in place
        own = dict(wrapper.graph_module.named_parameters()) | dict(wrapper.graph_module.named_buffers())
        with torch.no_grad():
            for key, value in full.state_dict().items():
                if key in own:
                    own[key].copy_(value)
    return wrapper.eval()


@pytest.mark.parametrize(("kwargs", "kind", "taken"), [
    ({"feature_cfg": {"feature_cls": "getter"}}, FeatureGetterNet, [0, 1, 2]),
    ({"feature_cfg": {"out_indices": (0, 2)}}, FeatureGetterNet, [0, 2]),
    ({"feature_cfg": {"out_indices": (0, 2)}, "out_indices": [-1]}, FeatureGetterNet, [2]),  # the argument wins
    ({"feature_cfg": {"feature_cls": "fx"}}, FeatureGraphNet, [0, 1, 2]),
    ({"feature_cfg": {"feature_cls": "FX", "out_indices": 2}}, FeatureGraphNet, [1, 2]),
    ({"feature_cfg": {"feature_cls": "fx"}, "feature_cls": "getter", "out_indices": (1,)}, FeatureGetterNet, [1]),
])
def test_features_only_merges_the_callers_feature_cfg(kwargs: dict, kind: type, taken: list, randomize) -> None:
    full = randomize(timm.create_model("cnet_digits", n_steps=2)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        maps = stage_maps(full, x)
        wrapper = _features("cnet_digits", full, n_steps=2, **kwargs)
        got = wrapper(x)
    assert type(wrapper) is kind
    assert wrapper.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in taken]
    assert len(got) == len(taken) and all(torch.equal(g, maps[i]) for g, i in zip(got, taken))


def test_an_unsupported_feature_class_is_refused_from_either_place() -> None:
    for kwargs in ({"feature_cfg": {"feature_cls": "hook"}}, {"feature_cls": "hook"}):
        with pytest.raises(ValueError, match=r"^feature_cls='hook': cnet_digits's feature maps .* expected "
                                             r"feature_cls='getter', 'fx' or none$"):
            timm.create_model("cnet_digits", features_only=True, **kwargs)
    with pytest.raises(ValueError, match=r"^feature_cfg=\['fx'\] is not valid: expected a dict"):
        timm.create_model("cnet_digits", features_only=True, feature_cfg=["fx"])


def test_the_graph_feature_extractor_scripts(randomize) -> None:
    full = randomize(timm.create_model("cnet_digits", scheme="rk4", n_steps=2)).eval()
    x = torch.randn(3, 1, 16, 16)
    wrapper = _features("cnet_digits", full, scheme="rk4", n_steps=2, feature_cfg={"feature_cls": "fx"})
    with torch.no_grad():
        got = scripted(wrapper)(x)
        expected = stage_maps(full, x)
    assert len(got) == 3 and all(torch.equal(g, e) for g, e in zip(got, expected))


# ---------------------------------------------------------------------- TorchScript
def _gradients(model: torch.nn.Module, x: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for param in params:
        param.grad = None
    model(x).square().sum().backward()
    return [param.grad.clone() for param in params]


@pytest.mark.parametrize("recompute", [False, True])
def test_torch_jit_script_gives_the_eager_outputs_and_gradients(recompute: bool, randomize) -> None:
    model = randomize(get_model("cnet_digits", scheme="rk4", n_steps=2))
    model.set_grad_checkpointing(recompute)
    script = scripted(model)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        model.eval()
        script.eval()
        torch.testing.assert_close(script(x), model(x), rtol=0, atol=0)
    model.train()
    script.train()
    params = list(model.parameters())
    torch.testing.assert_close(_gradients(script, x, params), _gradients(model, x, params), rtol=1e-6, atol=1e-7)
    assert script.original_name == "ContinuousNet"


def test_a_script_keeps_the_manifestation_it_was_compiled_at(randomize) -> None:
    model = randomize(get_model("cnet_digits", scheme="rk4", n_steps=2)).eval()
    x = torch.randn(2, 1, 8, 8)
    script = scripted(model)
    with torch.no_grad():
        at_rk4 = model(x)
        with model.manifestation(scheme="euler", n_steps=1):
            assert not torch.allclose(model(x), at_rk4)
            torch.testing.assert_close(script(x), at_rk4, rtol=0, atol=0)


def test_a_vector_ode_block_scripts(randomize) -> None:
    block = randomize(ODEBlock(3, unit="mlp", unit_kwargs={"hidden": 8}, n_steps=3, scheme="rk3", T=1.0,
                               skip_init=False)).eval()
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(scripted(block)(x), block(x), rtol=0, atol=0)


@pytest.mark.parametrize("root", ["model", "block"])
def test_an_fx_trace_scripts(root: str, randomize) -> None:
    model = randomize(get_model("cnet_digits", scheme="midpoint", n_steps=2)).eval()
    module, x = (model, torch.randn(2, 1, 8, 8)) if root == "model" else (model.stages[1], torch.randn(2, 16, 4, 4))
    traced = torch.fx.symbolic_trace(module)
    assert "_torch_Tensor_" not in traced.code  # the annotations are types, not strings
    with torch.no_grad():
        torch.testing.assert_close(scripted(traced)(x), module(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- torch.export and ONNX
@pytest.mark.parametrize("example_batch", [4, 1])
def test_the_exported_program_runs_any_batch_size(tmp_path, example_batch: int, randomize) -> None:
    model = randomize(get_model("cnet_digits", scheme="rk4", n_steps=2)).eval()
    path = export_program(model, torch.randn(example_batch, 1, 8, 8), tmp_path / "model.pt2")
    program = torch.export.load(path).module()
    with torch.no_grad():
        for batch in (1, 7):
            x = torch.randn(batch, 1, 8, 8)
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-6)


def test_the_onnx_graph_has_a_dynamic_batch_dimension(tmp_path, randomize) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = randomize(get_model("cnet_digits", scheme="rk4", n_steps=2)).eval()
    path = export_onnx(model, torch.randn(4, 1, 8, 8), tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    evaluator = ReferenceEvaluator(str(path))
    with torch.no_grad():
        for batch in (1, 7):
            x = torch.randn(batch, 1, 8, 8)
            output = torch.from_numpy(evaluator.run(None, {"images": x.numpy()})[0])
            torch.testing.assert_close(output, model(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- Lightning: several callbacks of one kind
def _fit(task, callbacks: list, ckpt_path=None, datamodule=None, **options) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_options(callbacks=callbacks, **options))
    trainer.fit(task, datamodule=datamodule or TinyDigits(), ckpt_path=ckpt_path)
    return trainer


class PoisonWeight(pl.Callback):
    """Write a NaN into the first kernel at the start of the batches of the given global steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            with torch.no_grad():
                pl_module.model.stages[0].unit.conv1.weight[0].view(-1)[0] = float("nan")


def test_state_keys_name_what_tells_two_instances_apart() -> None:
    def every_third_epoch(epoch: int) -> bool:
        return epoch % 3 == 2

    assert DepthRefinementCallback([2, 4]).state_key == "DepthRefinementCallback{'refine_at': [2, 4]}"
    assert DepthRefinementCallback(0.5, max_n_steps=8, noise_std=0.1).state_key == (
        "DepthRefinementCallback{'refine_at': 0.5, 'max_n_steps': 8}")
    assert DepthRefinementCallback(every_third_epoch).state_key == (
        "DepthRefinementCallback{'refine_at': 'test_peer_contracts.test_state_keys_name_what_tells_two_instances_apart"
        ".<locals>.every_third_epoch'}")
    assert NonFiniteGuard(verbose=False).state_key == "NonFiniteGuard"  # the key every guard had in 0.2.0
    assert NonFiniteGuard("rollback", lr_factor=0.25).state_key == (
        "NonFiniteGuard{'on_nonfinite': 'rollback', 'lr_factor': 0.25}")
    assert ManifestationMonitor().state_key == "ManifestationMonitor"
    assert ManifestationMonitor(prefix="sweep").state_key == "ManifestationMonitor{'prefix': 'sweep'}"
    lightning = pytest.importorskip("lightning_cnet.lightning")
    assert lightning.NonFiniteGuard(check_every_n_steps=5).state_key == NonFiniteGuard(check_every_n_steps=5).state_key


def test_a_second_refinement_callback_is_refused_at_setup() -> None:
    task = make_task()
    callbacks = [DepthRefinementCallback([1]), DepthRefinementCallback([2], noise_std=0.1)]
    with pytest.raises(MisconfigurationException, match=(
            r"^DepthRefinementCallback: the Trainer has 2 refinement callbacks \(DepthRefinementCallback\{'refine_at': "
            r"\[1\]\}, DepthRefinementCallback\{'refine_at': \[2\]\}\); each refines every ContinuousNet and ODEBlock "
            r"of the LightningModule, so they would refine the same modules: keep one, with the combined schedule$")):
        _fit(task, callbacks)
    assert n_steps(task) == [1, 1, 1]
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `DepthRefinementCallback`"):
        pl.Trainer(callbacks=[DepthRefinementCallback([1]), DepthRefinementCallback([1])])  # identical: Lightning's


def test_a_second_guard_is_refused_at_setup() -> None:
    # a stop guard would stop on the NaN loss of the batch the rollback guard skips
    callbacks = [NonFiniteGuard("rollback", verbose=False), NonFiniteGuard(check_every_n_steps=2)]
    with pytest.raises(MisconfigurationException, match=(
            r"^NonFiniteGuard: the Trainer has 2 guards \(NonFiniteGuard\{'on_nonfinite': 'rollback'\}, "
            r"NonFiniteGuard\{'check_every_n_steps': 2\}\); each watches the same loss and tensors, .*: keep one$")):
        _fit(make_task(), callbacks)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `NonFiniteGuard`"):
        pl.Trainer(callbacks=[NonFiniteGuard(), NonFiniteGuard(verbose=False)])  # the same key: Lightning's refusal


@pytest.mark.parametrize("lr_factor", [0.5, 0.25])
def test_a_guard_resumes_with_the_rollbacks_saved_under_its_key_or_an_earlier_one(tmp_path, lr_factor: float) -> None:
    guard = NonFiniteGuard("rollback", verbose=False)
    trainer = _fit(make_task(), [PoisonWeight({2}), guard], max_epochs=1)
    assert [entry["restored_step"] for entry in guard.rollbacks] == [2]
    trainer.save_checkpoint(tmp_path / "rolled_back.ckpt")
    saved = torch.load(tmp_path / "rolled_back.ckpt", weights_only=True)["callbacks"]
    assert saved["NonFiniteGuard{'on_nonfinite': 'rollback'}"] == {"rollbacks": guard.rollbacks}

    resumed = NonFiniteGuard("rollback", lr_factor=lr_factor, verbose=False)
    _fit(make_task(), [resumed], ckpt_path=tmp_path / "rolled_back.ckpt", max_epochs=2)
    assert resumed.rollbacks == guard.rollbacks  # max_rollbacks counts from there


def test_two_monitors_need_two_prefixes_and_then_write_apart() -> None:
    def monitors(second_prefix: str) -> list:
        return [ManifestationMonitor(schemes=["euler"], n_steps=[1], num_batches=1),
                ManifestationMonitor(schemes=["euler", "rk4"], n_steps=[1, 2], num_batches=1, prefix=second_prefix)]

    with pytest.raises(MisconfigurationException, match=(
            r"^ManifestationMonitor\(prefix='manifestation'\): the Trainer has 2 manifestation monitors logging "
            r"'manifestation/\.\.\.', which would write the same metrics; give each its own prefix")):
        _fit(make_task(), monitors("manifestation"), max_epochs=1, limit_train_batches=1)
    task = make_task()
    _, sweep = callbacks = monitors("sweep")
    trainer = _fit(task, callbacks, max_epochs=1, limit_train_batches=2)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    accuracies = [metrics[f"sweep/val_acc_{scheme}_{n}"] for scheme in ("euler", "rk4") for n in (1, 2)]
    assert metrics["manifestation/invariance_gap"] == 0.0  # one manifestation: its own gap, not averaged with sweep's
    assert metrics["sweep/invariance_gap"] == pytest.approx(max(accuracies) - min(accuracies))
    assert metrics["manifestation/val_acc_euler_1"] == metrics["sweep/val_acc_euler_1"]
    assert {key.split("/")[0] for key in metrics if "/" in key} >= {"manifestation", "sweep"}
    assert sweep.prefix == "sweep"


# ---------------------------------------------------------------------- checkpoints written by lightning-cnet 0.2.0
V0_2_0 = Path(__file__).resolve().parent / "fixtures" / "v0_2_0_digits.ckpt"


@pytest.mark.parametrize("settings", ["as written", "changed"])
def test_a_0_2_0_checkpoint_resumes_with_its_callback_states(tmp_path, settings: str) -> None:
    from lightning_cnet.data import DigitsDataModule
    from lightning_cnet.module import ContinuousNetClassifier

    written = torch.load(V0_2_0, weights_only=True)["callbacks"]
    assert {"DepthRefinementCallback", "NonFiniteGuard"} <= written.keys()  # the keys 0.2.0 used for every instance
    if settings == "as written":
        refinement, guard = DepthRefinementCallback([1], eval_batches=1), NonFiniteGuard()
    else:
        refinement = DepthRefinementCallback([1], max_n_steps=2, eval_batches=1)
        guard = NonFiniteGuard(check_every_n_steps=2)
    task = ContinuousNetClassifier("cnet_digits", scheme="midpoint", n_steps=1, T=2.0, lr=0.1)
    trainer = _fit(task, [refinement, guard], ckpt_path=V0_2_0, max_epochs=3, limit_train_batches=3,
                   limit_val_batches=1, datamodule=DigitsDataModule(image_size=8, batch_size=32, seed=0))
    assert refinement.history == written["DepthRefinementCallback"]["history"]  # restored, and no second refinement
    assert refinement.base_n_steps == [(1, 1, 1)] and n_steps(task) == [2, 2, 2]
    assert guard.rollbacks == []
    trainer.save_checkpoint(tmp_path / "resumed.ckpt")
    saved = torch.load(tmp_path / "resumed.ckpt", weights_only=True)["callbacks"]
    assert saved[refinement.state_key]["history"] == refinement.history and guard.state_key in saved


# ---------------------------------------------------------------------- docstring examples
@pytest.mark.parametrize("module_name", ["lightning_cnet._scripting", "lightning_cnet.callbacks._instances"])
def test_docstring_examples(module_name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module_name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
