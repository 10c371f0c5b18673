"""What the libraries a ContinuousNet plugs into expect of a model or a callback, stated in our own words: timm's
model contract (the default configuration, ``features_only`` with a ``feature_cfg``), TorchScript directly and
through ``torch.fx``, ``torch.export`` and ONNX at any batch size, and Lightning's contract for several callbacks of
one kind in a Trainer."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_cnet import ODEBlock, get_model, register_model
from lightning_cnet import timm_support
from lightning_cnet.analysis.export import export_onnx, export_program
from lightning_cnet.models import MODELS, ContinuousNet

timm = pytest.importorskip("timm")
from timm.models import FeatureGraphNet  # noqa: E402
from timm.models._features import FeatureGetterNet  # noqa: E402

BUILDERS = ("cnet_cifar", "cnet_cifar_wide", "cnet_digits")


def stage_maps(model: ContinuousNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The map after each stage, by running the modules one by one (stem, stage, stitch, stage, ...)."""
    maps, x = [], model.stem(x)
    for index, stage in enumerate(model.stages):
        x = stage(x if index == 0 else model.stitches[index - 1](x))
        maps.append(x)
    return maps


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


def test_scripting_helpers_docstring_examples() -> None:
    import doctest

    from lightning_cnet import _scripting

    result = doctest.testmod(_scripting, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
