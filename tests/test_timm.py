"""ContinuousNet in timm: the registry, pretrained_cfg and data config, features_only, forward_intermediates and
pruning, gradient checkpointing, weight-decay groups, and no timm import cost."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lightning_cnet import ContinuousNet, get_model, register_model, timm_support
from lightning_cnet.models import MODELS

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.models import group_parameters  # noqa: E402
from timm.models._features import feature_take_indices  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

timm_support.register_timm_models()  # what a user does after importing timm


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def stage_maps(model: ContinuousNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The map after each stage, by running the modules one by one (stem, stage, stitch, stage, ...)."""
    maps, x = [], model.stem(x)
    for index, stage in enumerate(model.stages):
        x = stage(x if index == 0 else model.stitches[index - 1](x))
        maps.append(x)
    return maps


def randomized(model: ContinuousNet) -> ContinuousNet:
    """Non-zero gates and random BatchNorm statistics, so that every stage changes its input."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if ".gate." in name:
                tensor.uniform_(0.5, 1.0)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.normal_(0.0, 0.2)
    return model.eval()


# ---------------------------------------------------------------------- registry
def test_import_costs_no_timm_import_hooks_nothing_and_registration_is_explicit():
    result = run_python(
        "import json, sys\n"
        "finders = list(sys.meta_path)\n"
        "import lightning_cnet\n"
        "imported_early, hooked = 'timm' in sys.modules, sys.meta_path != finders\n"
        "import timm\n"
        "before = timm.list_models('cnet*')\n"
        "from lightning_cnet.timm_support import register_timm_models\n"
        "registered = register_timm_models()\n"
        "print(json.dumps([imported_early, hooked, before, registered, timm.list_models('cnet*'),"
        " lightning_cnet.list_models(), timm.create_model('cnet_digits').num_classes, register_timm_models()]))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported_early, hooked, before, registered, in_timm, ours, classes, again = json.loads(
        result.stdout.splitlines()[-1])
    assert imported_early is False and hooked is False and before == []
    assert registered == in_timm == ours == ["cnet_cifar", "cnet_cifar_wide", "cnet_digits"] and classes == 10
    assert again == []  # registered once


@pytest.mark.slow
def test_timm_imported_first_also_learns_the_builders():
    result = run_python("import timm, lightning_cnet; print(timm.list_models('cnet*'))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["['cnet_cifar',", "'cnet_cifar_wide',", "'cnet_digits']"]


def test_hidden_timm_costs_nothing_and_the_backbone_methods_work_without_it():
    result = run_python(
        "import sys\n"
        "sys.modules['timm'] = None\n"
        "import torch, lightning_cnet\n"
        "from lightning_cnet.timm_support import register_timm_models\n"
        "net = lightning_cnet.get_model('cnet_digits').eval()\n"
        "maps = net.forward_intermediates(torch.randn(2, 1, 8, 8), indices=2, intermediates_only=True)\n"
        "net.set_grad_checkpointing(True)\n"
        "names = net.no_weight_decay()\n"
        "try:\n"
        "    register_timm_models()\n"
        "except ImportError as error:\n"
        "    message = str(error)\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('timm'))\n"
        "print([tuple(m.shape[1:]) for m in maps], net.grad_checkpointing, 'norm.weight' in names, loaded, message)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        "[(16, 4, 4), (32, 2, 2)] True True ['timm'] registering lightning_cnet's models with timm needs timm "
        "(pip install timm)"
    )


def test_create_model_passes_timm_and_builder_arguments():
    model = timm.create_model("cnet_cifar", num_classes=7, in_chans=2, scheme="rk4", n_steps=2)
    assert isinstance(model, ContinuousNet) and model.num_classes == 7 and model.stem.in_channels == 2
    assert model.resolution[0].scheme == "rk4" and model.resolution[0].n_steps == 2
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 7)
    wide = timm.create_model("cnet_cifar_wide")
    assert wide.num_classes == 100 and wide.num_features == 256  # the builder's own defaults


def test_a_builder_registered_later_is_added_with_its_own_defaults():
    name = "cnet_registered_in_a_test"

    def builder(**kwargs):
        return ContinuousNet((4, 8), **{"in_chans": 1, "num_classes": 3, **kwargs})

    register_model(builder, name=name)
    try:
        assert timm_support.register_timm_models() == [name]
        assert timm.list_models(name) == [name]
        model = timm.create_model(name)
        assert model.stem.in_channels == 1 and model.num_classes == 3  # not timm's default 3 channels / 1000
        assert model.pretrained_cfg["input_size"][0] == 1 and model.pretrained_cfg["num_classes"] == 3
        assert timm.create_model(name, num_classes=5).num_classes == 5
    finally:
        from timm.models._registry import _clear_model_entries

        _clear_model_entries(name)
        del MODELS._entries[name]
        timm_support._REGISTERED.discard(name)
        delattr(timm_support, name)


# ---------------------------------------------------------------------- data configuration
def test_pretrained_cfg_carries_each_builders_data():
    from lightning_cnet.data import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule

    digits = DigitsDataModule(image_size=16)
    digits.setup()
    images, _ = next(iter(digits.train_dataloader()))
    expected = {
        "cnet_cifar": ((3, 32, 32), CIFAR10DataModule.mean, CIFAR10DataModule.std, 10),
        "cnet_cifar_wide": ((3, 32, 32), CIFAR100DataModule.mean, CIFAR100DataModule.std, 100),
        "cnet_digits": (tuple(images.shape[1:]), (digits.mean,), (digits.std,), digits.num_classes),
    }
    for name, (input_size, mean, std, num_classes) in expected.items():
        model = timm.create_model(name)
        cfg = model.pretrained_cfg
        assert cfg["classifier"] == "fc" and model.get_submodule(cfg["classifier"]) is model.get_classifier()
        assert cfg["first_conv"] == "stem" and cfg["num_classes"] == num_classes == model.num_classes
        config = resolve_data_config({}, model=model)
        assert config["input_size"] == input_size
        np.testing.assert_allclose(config["mean"], mean, atol=5e-5)
        np.testing.assert_allclose(config["std"], std, atol=5e-5)
        assert model(torch.zeros(2, *input_size)).shape == (2, num_classes)


def test_timm_eval_transform_is_the_cifar_data_modules():
    from lightning_cnet.data import CIFAR10DataModule

    model = timm.create_model("cnet_cifar")
    timm_transform = create_transform(**resolve_data_config({}, model=model))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ours = CIFAR10DataModule().eval_transform(image)
    torch.testing.assert_close(timm_transform(image), ours, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- weights
def test_pretrained_is_refused_while_no_weights_are_published():
    with pytest.raises(ValueError, match=r"no pretrained weights are published for 'cnet_cifar'.*pretrained=False"):
        timm.create_model("cnet_cifar", pretrained=True)


def test_own_refined_weights_load_through_timm(tmp_path):
    trained = randomized(get_model("cnet_digits", n_steps=1, T=4.0))
    trained.refine()
    trained.refine()
    trained = randomized(trained)
    x = torch.randn(3, 1, 16, 16)
    file = tmp_path / "weights.safetensors"
    save_file(trained.state_dict(), str(file))
    checkpoint = tmp_path / "weights.pth"
    torch.save({"state_dict": trained.state_dict()}, checkpoint)

    loaded = timm.create_model("cnet_digits", pretrained=True, pretrained_cfg_overlay={"file": str(file)}, T=4.0)
    from_checkpoint = timm.create_model("cnet_digits", checkpoint_path=str(checkpoint), T=4.0)
    for model in (loaded, from_checkpoint):
        assert model.resolution == trained.resolution  # refined 1 -> 4 pieces on the way in
        torch.testing.assert_close(model.eval()(x), trained(x), rtol=0, atol=0)

    new_head = timm.create_model("cnet_digits", pretrained=True, num_classes=4, T=4.0,
                                 pretrained_cfg_overlay={"file": str(file)})
    assert new_head.fc.out_features == 4
    torch.testing.assert_close(new_head.eval().forward_features(x), trained.forward_features(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- features
@pytest.mark.parametrize("indices", [None, 1, 2, 3, [0], [2], [0, 2], [-1], (0, -2), [1, 2]])
def test_forward_intermediates_takes_timms_indices(indices):
    model = randomized(get_model("cnet_digits", n_steps=2))
    x = torch.randn(2, 1, 8, 8)
    maps = stage_maps(model, x)
    taken, _ = feature_take_indices(3, indices)
    final, intermediates = model.forward_intermediates(x, indices=indices)
    assert len(intermediates) == len(taken)
    for index, got in zip(sorted(taken), intermediates):
        torch.testing.assert_close(got, maps[index], rtol=0, atol=0)
    torch.testing.assert_close(final, torch.relu(model.norm(maps[-1])), rtol=0, atol=0)
    only = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(only, intermediates))


def test_forward_intermediates_norm_stop_early_and_bad_arguments():
    model = randomized(get_model("cnet_digits", n_steps=2))
    x = torch.randn(2, 1, 8, 8)
    maps = stage_maps(model, x)
    _, (last,) = model.forward_intermediates(x, indices=[-1], norm=True)
    torch.testing.assert_close(last, torch.relu(model.norm(maps[-1])), rtol=0, atol=0)

    calls = []
    model.stages[1].register_forward_hook(lambda *args: calls.append(1))
    final, (first,) = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert calls == [] and torch.equal(first, maps[0]) and torch.equal(final, maps[0])

    with pytest.raises(ValueError, match="output_fmt='NHWC' is not supported: expected 'NCHW'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    bad_indices = {4: "the last 4 stages: expected 1 to 3", 0: "expected 1 to 3",
                   (3,): "out of range: expected -3 to 2", (): "takes no stage"}
    for bad, message in bad_indices.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            model.forward_intermediates(x, indices=bad)


def test_prune_intermediate_layers_keeps_what_is_taken():
    model = randomized(get_model("cnet_digits", n_steps=2))
    x = torch.randn(2, 1, 8, 8)
    maps = stage_maps(model, x)
    kept = dict(model.named_parameters())
    assert model.prune_intermediate_layers([0, -2]) == [0, 1]
    assert len(model.stages) == 2 and len(model.stitches) == 1 and model.num_features == 16
    expected = {name for name in kept if name.startswith(("stem.", "stages.0.", "stages.1.", "stitches.0."))}
    assert {name for name, _ in model.named_parameters()} == expected  # norm and fc are gone
    torch.testing.assert_close(model(x), maps[1], rtol=0, atol=0)  # no norm, pooling or classifier any more
    intermediates = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(intermediates, maps[:2]))


def test_features_only_gives_the_stage_maps_and_trains_every_parameter():
    full = randomized(timm.create_model("cnet_cifar", n_steps=2))
    features = timm.create_model("cnet_cifar", n_steps=2, features_only=True, out_indices=(0, 1))
    every = timm.create_model("cnet_cifar", n_steps=2, features_only=True)
    for wrapper in (features, every):
        kept = wrapper.model.state_dict()
        wrapper.model.load_state_dict({name: value for name, value in full.state_dict().items() if name in kept})
    x = torch.randn(2, 3, 32, 32)
    maps = stage_maps(full, x)
    assert features.feature_info.channels() == [16, 32] and features.feature_info.reduction() == [1, 2]
    assert every.feature_info.channels() == [16, 32, 64] and every.feature_info.reduction() == [1, 2, 4]
    for wrapper, expected in ((features, maps[:2]), (every, maps)):
        got = wrapper.eval()(x)
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    every.train()
    sum(m.sum() for m in every(x)).backward()
    assert all(p.grad is not None for p in every.parameters())  # nothing unused: DDP needs no find_unused
    with pytest.raises(ValueError, match="feature_cls='list': cnet_cifar's feature maps come from forward_interm"):
        timm.create_model("cnet_cifar", features_only=True, feature_cls="list")


def test_global_pool_and_dropout_arguments():
    unpooled = randomized(timm.create_model("cnet_digits", num_classes=0, global_pool="", drop_rate=0.0))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(unpooled(x), unpooled.forward_features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="global_pool='' .*needs num_classes=0"):
        timm.create_model("cnet_digits", global_pool="")
    with pytest.raises(ValueError, match="global_pool='max' is not supported"):
        timm.create_model("cnet_digits", global_pool="max")
    with pytest.raises(ValueError, match="drop_rate=0.2: cnet_digits has no dropout"):
        timm.create_model("cnet_digits", drop_rate=0.2)
    unpooled.reset_classifier(5, "avg")
    assert unpooled(x).shape == (2, 5)


# ---------------------------------------------------------------------- training helpers
def test_set_grad_checkpointing_recomputes_each_step_with_the_same_gradients():
    x, target = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    results = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = randomized(timm.create_model("cnet_digits", scheme="rk4", n_steps=2)).train()
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable and all(s.recompute_steps is enable for s in model.stages)
        calls = []
        for stage in model.stages:
            stage.unit.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        loss = torch.nn.functional.cross_entropy(model(x), target)
        in_forward = len(calls)
        loss.backward()
        results.append((in_forward, len(calls) - in_forward, [p.grad.clone() for p in model.parameters()]))
    (plain_forward, plain_backward, plain_grads), (forward, backward, recomputed_grads) = results
    assert plain_forward == forward == 3 * 2 * 4  # 3 stages x 2 steps x 4 RK stages
    assert plain_backward == 0 and backward > 0  # the residual units run again in backward
    for a, b in zip(plain_grads, recomputed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_weight_decay_names_norm_affines_and_gates_for_timms_optimizer():
    model = timm.create_model("cnet_digits", n_steps=2, unit_kwargs={"bias": True})
    model.refine()
    names = model.no_weight_decay()
    by_layer_name = {name for name, _ in model.named_parameters()
                     if re.search(r"(^|\.)(norm\d?|gate)\.", name)}
    assert names == by_layer_name and any(".pieces.3." in n for n in names) and "norm.weight" in names
    decay_of = {}
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=5e-4, filter_bias_and_bn=False)
    for group in optimizer.param_groups:
        decay_of.update({id(p): group["weight_decay"] for p in group["params"]})
    for name, param in model.named_parameters():
        assert decay_of[id(param)] == (0.0 if name in by_layer_name else 5e-4), name


def test_group_matcher_orders_parameters_by_depth():
    model = timm.create_model("cnet_digits")
    layer_of = group_parameters(model, model.group_matcher(), reverse=True)
    depth = {"stem": 0, "stages.0": 1, "stitches.0": 2, "stages.1": 3, "stitches.1": 4, "stages.2": 5, "norm": 5,
             "fc": 6}
    for name, _ in model.named_parameters():
        prefix = next(p for p in depth if name.startswith(p + "."))
        assert layer_of[name] == depth[prefix], name
