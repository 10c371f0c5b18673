"""ContinuousNet builders in timm's model registry: ``timm.create_model("cnet_cifar", num_classes=100)``.

:func:`register_timm_models` makes every builder of :func:`lightning_cnet.list_models` known to timm, the way timm's
own model modules register theirs when they are imported: call it once after ``import timm``, and again after
registering builders of your own with lightning_cnet. When timm is already imported, ``import lightning_cnet`` calls it
itself (and never imports timm otherwise); nothing is hooked into Python's import system.

Each timm entrypoint builds the model through ``timm.models.build_model_with_cfg``, so timm's conventions hold:

* ``model.pretrained_cfg`` holds the input size, mean and std of the data the builder is made for, the size of the
  final feature map at that input size (``pool_size``: ``forward_features`` gives ``[B, num_features, *pool_size]``)
  and the names of the first convolution (``stem``) and the classifier (``fc``), so ``timm.data.resolve_data_config({},
  model=model)`` gives the model's own preprocessing (:data:`PRETRAINED_CFGS`);
* ``pretrained=True`` raises a ``ValueError`` while no weights are published, unless the configuration names weights
  of your own (``pretrained_cfg_overlay=dict(file="weights.safetensors")``), which are then loaded, refining a
  freshly built coarse model to the checkpoint's resolution; ``checkpoint_path=`` works the same way;
* ``features_only=True`` returns timm's ``FeatureGetterNet`` around the model: its forward gives the feature maps
  after the stages chosen by ``out_indices`` (default: all), ``feature_info`` their channels and reductions, and
  the stages, norm and classifier it does not need are removed. ``feature_cls="fx"`` (or
  ``feature_cfg={"feature_cls": "fx"}``) gives timm's ``FeatureGraphNet`` instead: the same maps from the model's
  ``torch.fx`` graph, which ``torch.jit.script`` compiles. A ``feature_cfg`` is merged with these defaults, and
  ``out_indices``/``feature_cls`` given as arguments win over its entries, as in timm;
* ``global_pool="avg"`` or ``""`` is passed to :meth:`~lightning_cnet.models.ContinuousNet.reset_classifier`; timm's
  training script passes ``drop_rate=0.0``, accepted (a ContinuousNet has no dropout; other rates are refused).

Data configuration chosen for the built-in builders (the data modules of :mod:`lightning_cnet.data`):

* ``cnet_cifar``: ``3x32x32`` with the CIFAR-10 mean/std of ``CIFAR10DataModule``, 10 classes;
* ``cnet_cifar_wide``: ``3x32x32`` with the CIFAR-100 mean/std of ``CIFAR100DataModule``, 100 classes (the paper's
  wide CIFAR-100 model);
* ``cnet_digits``: ``1x16x16`` (the default ``image_size`` of ``DigitsDataModule``), mean ``0.3045`` and std
  ``0.3186``: the statistics ``DigitsDataModule(image_size=16)`` computes on its training images (pixels divided
  by 16, upsampled bilinearly), on timm's ``[0, 1]`` pixel scale.

All use ``crop_pct=1.0`` (no crop: the images already have the model's size) and bilinear interpolation.

Example:
    >>> import timm  # doctest: +SKIP
    >>> register_timm_models()  # doctest: +SKIP
    ['cnet_cifar', 'cnet_cifar_wide', 'cnet_digits']
    >>> model = timm.create_model("cnet_cifar", num_classes=100, scheme="rk4", n_steps=2)  # doctest: +SKIP
    >>> timm.data.resolve_data_config({}, model=model)["input_size"]  # doctest: +SKIP
    (3, 32, 32)
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

from torch import nn

from lightning_cnet.models import MODELS, ContinuousNet, _stage_indices, list_models

_PAPER = {"paper_name": "Continuous-in-Depth Neural Networks", "paper_ids": "arXiv:2008.02389"}
_NO_CROP = {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear", "first_conv": "stem",
            "classifier": "fc"}

#: timm's ``pretrained_cfg`` of each built-in builder (no weights: the data it is made for and the layer names).
#: ``pool_size`` is the final feature map's size at ``input_size``: three stages, two stride-2 stitches.
PRETRAINED_CFGS: dict[str, dict[str, Any]] = {
    "cnet_cifar": {"input_size": (3, 32, 32), "pool_size": (8, 8), "mean": (0.4914, 0.4822, 0.4465),
                   "std": (0.2470, 0.2435, 0.2616), "num_classes": 10, **_NO_CROP, **_PAPER},
    "cnet_cifar_wide": {"input_size": (3, 32, 32), "pool_size": (8, 8), "mean": (0.5071, 0.4865, 0.4409),
                        "std": (0.2673, 0.2564, 0.2762), "num_classes": 100, **_NO_CROP, **_PAPER},
    "cnet_digits": {"input_size": (1, 16, 16), "pool_size": (4, 4), "mean": (0.3045,), "std": (0.3186,),
                    "num_classes": 10, **_NO_CROP, **_PAPER},
}

#: Read by timm's ``register_model``: the ``pretrained_cfg`` of each entrypoint of this module.
default_cfgs: dict[str, dict[str, Any]] = {}

#: Names this module registered with timm.
_REGISTERED: set[str] = set()

#: Dropout arguments timm's scripts pass; a ContinuousNet has none, so only zero is accepted.
_DROPOUT_ARGUMENTS = ("drop_rate", "drop_path_rate", "drop_block_rate")

#: Keys of a ``pretrained_cfg`` that name weights.
_WEIGHT_SOURCES = ("url", "file", "hf_hub_id", "state_dict")

#: ``feature_cls`` names accepted with ``features_only=True``: timm's FeatureGetterNet and FeatureGraphNet.
_FEATURE_CLASSES = ("getter", "fx")


def register_timm_models(pretrained_cfgs: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Register with timm every lightning_cnet builder it does not know yet.

    Args:
        pretrained_cfgs: per builder name, timm ``pretrained_cfg`` entries (``input_size``, ``mean``, ``std``, ...)
            that replace the built-in ones. A builder with none (one registered by a user) gets timm's default
            configuration, with ``num_classes`` and the input channels of the model it builds. A ``pool_size`` not
            given (or left over from a built-in configuration whose ``input_size`` is replaced) is that of each model
            built: its input size divided by the last stage's reduction, rounded up.

    Returns:
        The names registered by this call.

    Raises:
        ImportError: timm is not installed.

    Example:
        >>> from lightning_cnet import ContinuousNet, register_model
        >>> @register_model(name="cnet_small_digits")  # doctest: +SKIP
        ... def small(**kwargs):
        ...     return ContinuousNet((4, 8), in_chans=1, **kwargs)
        >>> register_timm_models({"cnet_small_digits": {"input_size": (1, 8, 8)}})  # doctest: +SKIP
        ['cnet_small_digits']
    """
    try:
        from timm.models import is_model, register_model
    except ImportError as error:
        raise ImportError("registering lightning_cnet's models with timm needs timm (pip install timm)") from error
    overrides = dict(pretrained_cfgs or {})
    registered = []
    for name in list_models():
        if name in _REGISTERED:
            continue
        if is_model(name):
            warnings.warn(f"timm already has a model named {name!r}; lightning_cnet's builder is not registered "
                          "with timm under that name", stacklevel=2)
            continue
        override = overrides.get(name, {})
        cfg = {**PRETRAINED_CFGS.get(name, {}), **override}
        if "input_size" in override and "pool_size" not in override:
            cfg.pop("pool_size", None)
        if cfg:
            default_cfgs[name] = cfg
        entrypoint = _timm_entrypoint(name)
        setattr(sys.modules[__name__], name, entrypoint)
        register_model(entrypoint)
        _REGISTERED.add(name)
        registered.append(name)
    return registered


def create_timm_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """What ``timm.create_model(name, ...)`` runs for a lightning_cnet builder.

    Args:
        name: a registered builder.
        pretrained: load the weights named by the ``pretrained_cfg`` (there are no published ones).
        **kwargs: timm's arguments (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``features_only``,
            ``out_indices``, ``global_pool``, ``cache_dir``, ...) and the builder's (``num_classes``, ``in_chans``,
            ``scheme``, ``n_steps``, ...).

    Raises:
        ValueError: ``pretrained=True`` without weights to load, a non-zero dropout rate, an unknown
            ``global_pool``, a ``feature_cls`` other than ``"getter"`` or ``"fx"``.
    """
    from timm.models import build_model_with_cfg

    for argument in _DROPOUT_ARGUMENTS:
        rate = kwargs.pop(argument, 0.0)
        if rate:
            raise ValueError(f"{argument}={rate!r}: {name} has no dropout; expected {argument}=0 or None")
    feature_cfg = _feature_cfg(name, kwargs.pop("feature_cfg", None), kwargs.pop("feature_cls", None))
    if pretrained:
        _check_weights_exist(name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    global_pool = kwargs.pop("global_pool", None)
    builder_defaults = None if name in default_cfgs else set(kwargs)
    built: list[ContinuousNet] = []
    model = build_model_with_cfg(
        partial(_build, name, global_pool, builder_defaults, built), name, pretrained, feature_cfg=feature_cfg,
        **kwargs,
    )
    _describe_instance(model, built[0], timm_defaults=builder_defaults is not None)
    return model


# ---------------------------------------------------------------------- building
def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_timm_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm entrypoint of lightning_cnet's {name!r} builder (see create_timm_model)."
    return entrypoint


def _build(name: str, global_pool: str | None, given: set[str] | None, built: list[ContinuousNet],
           **kwargs: Any) -> ContinuousNet:
    """Build ``name`` with timm's keyword arguments and append it to ``built``; ``given`` (for a builder without a
    configuration of its own) names those the caller gave, so the ``num_classes``/``in_chans`` of timm's default
    configuration are dropped."""
    if given is not None:
        kwargs = {key: value for key, value in kwargs.items()
                  if key in given or key not in ("num_classes", "in_chans")}
    model = MODELS.get(name)(**kwargs)
    if global_pool is not None and global_pool != model.global_pool:
        model.reset_classifier(model.num_classes, global_pool)
    built.append(model)
    return model


def _feature_cfg(name: str, feature_cfg: Mapping[str, Any] | None, feature_cls: Any) -> dict[str, Any]:
    """The ``feature_cfg`` handed to timm: ours (all stages, ``FeatureGetterNet``) updated by the caller's, with a
    ``feature_cls`` argument winning over its entry; ``"fx"`` becomes :func:`_graph_features`.

    Raises:
        ValueError: a ``feature_cfg`` that is not a mapping, or a ``feature_cls`` other than ``"getter"``/``"fx"``.
    """
    if feature_cfg is not None and not isinstance(feature_cfg, Mapping):
        raise ValueError(f"feature_cfg={feature_cfg!r} is not valid: expected a dict of FeatureGetterNet or "
                         "FeatureGraphNet arguments (feature_cls, out_indices, ...)")
    merged = {"feature_cls": "getter", "out_indices": None, **(feature_cfg or {})}
    if feature_cls is not None:
        merged["feature_cls"] = feature_cls
    kind = merged["feature_cls"]
    if not isinstance(kind, str) or kind.lower() not in _FEATURE_CLASSES:
        raise ValueError(
            f"feature_cls={kind!r}: {name}'s feature maps come from forward_intermediates (timm's FeatureGetterNet) "
            "or from its torch.fx graph (FeatureGraphNet); expected feature_cls='getter', 'fx' or none"
        )
    if kind.lower() == "fx":
        merged["feature_cls"] = _graph_features
    return merged


def _graph_features(model: ContinuousNet, out_indices: Any = None, **kwargs: Any) -> nn.Module:
    """timm's ``FeatureGraphNet`` around ``model`` taking the stages ``out_indices`` names, counted as in
    :meth:`~lightning_cnet.models.ContinuousNet.forward_intermediates` (``None``: all)."""
    from timm.models import FeatureGraphNet

    taken, _ = _stage_indices(len(model.feature_info), out_indices)
    return FeatureGraphNet(model, out_indices=tuple(taken), **kwargs)


def _check_weights_exist(name: str, pretrained_cfg: Any, overlay: dict[str, Any] | None) -> None:
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if not any(getattr(cfg, source) is not None for source in _WEIGHT_SOURCES):
        raise ValueError(
            f"pretrained=True: no pretrained weights are published for {name!r} yet; use pretrained=False, or load "
            "your own with pretrained_cfg_overlay=dict(file='weights.safetensors') or checkpoint_path='weights.pth'"
        )


def _describe_instance(model: nn.Module, net: ContinuousNet, timm_defaults: bool) -> None:
    """Complete the ``pretrained_cfg`` of ``model`` (``net`` or a feature wrapper around it): with timm's default
    configuration (``timm_defaults``), the input channels and classes of ``net``; for a classifier without one, the
    final feature map's size at the configured input size."""
    cfg = cast(dict[str, Any], model.pretrained_cfg)  # timm sets it on every model it builds
    if timm_defaults:
        cfg.update(first_conv="stem", input_size=(net.in_chans, *cfg["input_size"][1:]))
        if net is model:
            cfg.update(num_classes=net.num_classes, classifier="fc")
    if net is model and cfg.get("pool_size") is None:
        reduction = net.feature_info[-1]["reduction"]
        cfg["pool_size"] = tuple(-(-size // reduction) for size in cfg["input_size"][1:])


# ---------------------------------------------------------------------- registration at ``import lightning_cnet``
def register_with_timm_quietly() -> None:
    """:func:`register_timm_models`, turning a failure into a warning (``import lightning_cnet`` calls it when timm is
    already imported, and must not fail because of timm)."""
    try:
        register_timm_models()
    except Exception as error:  # noqa: BLE001 - a registration problem must not break importing lightning_cnet
        warnings.warn(f"lightning_cnet could not register its models with timm: {error}", stacklevel=2)


__all__ = ["PRETRAINED_CFGS", "create_timm_model", "register_timm_models", "register_with_timm_quietly"]
