"""What every task around a ContinuousNet backbone shares, written once for both Lightning namespaces.

:class:`BackboneTask` builds the backbone from a registered name and its keyword arguments (``model`` plus
``model_kwargs``, the way timm's ``create_model(name, **kwargs)`` passes them on: the backbone's options are declared
once, by the backbone) or takes one ready-made, and gives a task the rest: ``torch.compile``, the check that the model
fits the data, checkpoint checks and all-or-nothing loading, the per-epoch resolution log, the optimizer and LR
schedule, and the class attributes ``monitor``/``mode`` that the callbacks and the CLI read. A task is then one file
that adds its head, loss and metrics (:mod:`lightning_cnet.classification`, :mod:`lightning_cnet.segmentation`), mixed
with a ``LightningModule`` of either namespace (:mod:`lightning_cnet.module`, :mod:`lightning_cnet.lightning`).

Example:
    >>> from lightning_cnet.module import ContinuousNetClassifier
    >>> task = ContinuousNetClassifier("cnet_digits", model_kwargs={"scheme": "rk4", "n_steps": 2, "T": 2.0})
    >>> task.model.resolution[0].scheme, task.monitor, task.mode
    ('rk4', 'val_acc', 'max')
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from lightning_cnet._transaction import restored_on_error
from lightning_cnet._validation import TRAINING_RANGES, check_ranges
from lightning_cnet.integrators import get_scheme
from lightning_cnet.models import MODELS, ContinuousNet, get_model

if TYPE_CHECKING:
    from lightning_cnet._namespace import Namespace

    # A task is mixed with a LightningModule: to a type checker it is an nn.Module (what else it uses of the
    # LightningModule, BackboneTask declares)
    _LightningModuleBase = nn.Module
else:
    _LightningModuleBase = object

#: Task arguments that must agree with the data module's attributes of the same name (the CLI links them).
DATA_ARGUMENTS = ("num_classes", "in_chans")


def _call_backbone(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's forward, as :class:`CompiledBackbone` compiles it: the backbone is an argument, so that every copy
    of a task (``copy.deepcopy`` by weight-averaging callbacks) runs its own backbone through the same compiled code."""
    logits: torch.Tensor = model(x)
    return logits


def build_backbone(model: str, model_kwargs: Mapping[str, Any] | None = None,
                   **data_shape: int | None) -> ContinuousNet:
    """The registered model ``model`` built with ``model_kwargs`` and the data's shape (``None`` values are left out).

    Raises:
        ValueError: an unknown model, a keyword its builder does not take, or a value the backbone refuses.

    Example:
        >>> build_backbone("cnet_digits", {"n_steps": 2}, num_classes=3, in_chans=None).num_classes
        3
    """
    kwargs = dict(model_kwargs or {})
    for name, value in data_shape.items():
        if value is None:
            continue
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"model_kwargs has {name}={kwargs[name]!r} but the task has {name}={value!r}; give it "
                             "once")
        kwargs[name] = value
    try:
        return get_model(model, **kwargs)
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unexpected is None:
            raise
        accepted = ", ".join(_accepted_kwargs(model))
        raise ValueError(f"model_kwargs has {unexpected.group(1)!r}, which {model} does not take; expected some of "
                         f"{accepted}") from None


def _accepted_kwargs(model: str) -> list[str]:
    """Keyword arguments the builder of ``model`` takes (:class:`ContinuousNet`'s when it passes ``**kwargs`` on)."""
    parameters = inspect.signature(MODELS.get(model)).parameters
    names = [name for name, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        names += [name for name in inspect.signature(ContinuousNet).parameters if name != "widths"]
    return [name for name in dict.fromkeys(names) if name != "weights"]


def compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments that ``compile`` asks for (``None``: do not compile).

    Raises:
        ValueError: ``compile`` is neither a bool nor a dict, or the dict has a key ``torch.compile`` does not take.

    Example:
        >>> compile_options(True), compile_options(False), compile_options({"dynamic": False})
        ({}, None, {'dynamic': False})
    """
    if isinstance(compile, bool):
        return {} if compile else None
    if not isinstance(compile, Mapping):
        raise ValueError(f"compile={compile!r} is not valid: expected True, False or a dict of torch.compile "
                         "keyword arguments")
    accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(str(key) for key in compile if key not in accepted)
    if unknown:
        raise ValueError(f"compile has keys torch.compile does not take: {', '.join(unknown)}; expected some of "
                         f"{', '.join(accepted)}")
    return dict(compile)


class CompiledBackbone:
    """``torch.compile`` of a backbone's forward that never keeps graphs of replaced parameters.

    TorchDynamo's guards already recompile when the model changes (a refinement changes the number of pieces and the
    step plan), but the old graphs stay cached next to the new ones and count against
    ``torch._dynamo.config.recompile_limit`` (8 per function): a few refinements, each followed by training,
    validation and a smaller last batch, exhaust it and the backbone silently runs eagerly. So when the number of
    weight pieces per stage changes, the compiled code's cache is emptied first and the next call compiles once for
    the new parameters. A change of manifestation alone (scheme, step count) keeps the cache: evaluating at another
    step count and coming back reuses both graphs.

    Args:
        options: keyword arguments of ``torch.compile``.
        function: what to compile, ``function(backbone, images)`` (default: the backbone's forward; a dense task
            compiles its feature maps).

    Example:
        >>> from lightning_cnet.models import get_model
        >>> net = get_model("cnet_digits")
        >>> compiled = CompiledBackbone({"backend": "eager"})
        >>> compiled(net, torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, options: dict[str, Any],
                 function: Callable[[nn.Module, torch.Tensor], Any] = _call_backbone) -> None:
        self.options = dict(options)
        self.function = function
        self._compiled = torch.compile(function, **self.options)
        self._pieces: tuple[int, ...] | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor) -> Any:
        pieces = _pieces_per_stage(model)
        if pieces != self._pieces:
            if self._pieces is not None:
                torch._dynamo.eval_frame.remove_from_cache(self.function)
            self._pieces = pieces
        return self._compiled(model, x)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the compiled callable (``ddp_spawn`` pickles the task); it is rebuilt on unpickling."""
        return {"options": self.options, "function": self.function}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state["options"], state.get("function", _call_backbone))


def _pieces_per_stage(model: nn.Module) -> tuple[int, ...]:
    resolutions = getattr(model, "stage_resolutions", ())
    return tuple(resolution.n_basis for resolution in resolutions)


class BackboneTask(_LightningModuleBase):
    """A task around a ContinuousNet backbone (mix with a ``LightningModule`` class; subclass to add a head and a loss).

    Args:
        model: a registered model name (:func:`~lightning_cnet.models.list_models`).
        model_kwargs: keyword arguments of the model's builder, i.e. of :class:`~lightning_cnet.models.ContinuousNet`
            (``scheme``, ``n_steps``, ``n_basis``, ``basis``, ``T``, ``unit``, ``unit_kwargs``, ``skip_init``,
            ``recompute_steps``, ...); ``T`` is the physical depth of each stage (for a model refined during
            training, the step count of the final model).
        num_classes: classes to predict (the classifier: default the model's own; a dense task: required).
        in_chans: input channels (default: the model's own, 1 for ``cnet_digits``).
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``; LightningCLI's ``--optimizer`` overrides it.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        lr_schedule: ``"cosine"`` (over ``max_epochs``), ``"step"`` (``milestones``/``gamma``) or
            ``"constant"``; LightningCLI's ``--lr_scheduler`` overrides it.
        milestones: epochs at which the ``"step"`` schedule multiplies the LR by ``gamma``.
        gamma: decay factor of the ``"step"`` schedule.
        compile: ``torch.compile`` the backbone at ``setup`` (``True``, or a dict of ``torch.compile`` keyword
            arguments such as ``{"mode": "max-autotune", "dynamic": False}``); off by default. After a change of
            the number of weight pieces (refinement, compression, loading a finer checkpoint) the graphs of the old
            parameters are dropped and the backbone is compiled again at its next call (see
            :class:`CompiledBackbone`).
        backbone: use this ContinuousNet instead of building ``model`` (not saved in hyperparameters).

    Class attributes a task sets: ``monitor`` and ``mode``, the logged validation quantity that the callbacks measure
    and the CLI's checkpoint keeps the best of, and whether lower or higher is better; ``backbone_function``, what
    :meth:`run_backbone` computes (``function(backbone, images)``).
    """

    #: The Lightning namespace of the concrete class.
    lightning: ClassVar[Namespace]
    #: The validation quantity that the callbacks measure and the CLI's checkpoint keeps the best of.
    monitor: ClassVar[str] = "val_loss"
    #: ``"min"`` or ``"max"``: whether a lower or a higher ``monitor`` is better.
    mode: ClassVar[str] = "min"
    #: What :meth:`run_backbone` computes (and ``compile`` compiles): ``function(backbone, images)``.
    backbone_function: ClassVar[Callable[[nn.Module, torch.Tensor], Any]] = staticmethod(_call_backbone)

    if TYPE_CHECKING:  # what the task uses of the LightningModule it is mixed with, beyond nn.Module
        hparams: Any
        trainer: Any

        def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None: ...

        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None: ...

    def __init__(
        self,
        model: str = "cnet_digits",
        *,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        compile: bool | dict[str, Any] = False,
        backbone: ContinuousNet | None = None,
    ) -> None:
        super().__init__()
        check_ranges(TRAINING_RANGES, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "gamma": gamma,
                                       "milestones": milestones})
        self.save_hyperparameters(ignore=["backbone"])
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={optimizer!r} is not known: expected 'sgd' or 'adamw'")
        if lr_schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"lr_schedule={lr_schedule!r} is not known: expected 'cosine', 'step' or 'constant'")
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise ValueError(f"model_kwargs={model_kwargs!r} must be a dict of the model's keyword arguments")
        self._compile_options = compile_options(compile)
        self._compiled_backbone: CompiledBackbone | None = None
        self.model: ContinuousNet = backbone if backbone is not None else self.build_backbone(
            model, dict(model_kwargs or {}), num_classes=num_classes, in_chans=in_chans)
        self.in_chans = self.model.in_chans

    def build_backbone(self, model: str, model_kwargs: dict[str, Any], *, num_classes: int | None,
                       in_chans: int | None) -> ContinuousNet:
        """Build the backbone (a task overrides this to size its classifier differently)."""
        return build_backbone(model, model_kwargs, num_classes=num_classes, in_chans=in_chans)

    def run_backbone(self, x: torch.Tensor) -> Any:
        """``backbone_function(self.model, x)``, compiled if ``compile`` asked for it."""
        if self._compiled_backbone is None:
            return type(self).backbone_function(self.model, x)
        return self._compiled_backbone(self.model, x)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        """Check that the model fits the data module (same ``num_classes`` and ``in_chans``), then compile the
        backbone if ``compile`` asks for it."""
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in DATA_ARGUMENTS:
            ours, theirs = getattr(self, name, None), getattr(datamodule, name, None)
            if ours is not None and theirs is not None and theirs != ours:
                raise ValueError(
                    f"the model has {name}={ours} but {type(datamodule).__name__} has {name}={theirs}; "
                    f"build the model with {name}={theirs}"
                )
        if self._compile_options is not None and self._compiled_backbone is None:
            self._compiled_backbone = CompiledBackbone(self._compile_options, type(self).backbone_function)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model before any tensor is loaded (see :func:`check_checkpoint`)."""
        check_checkpoint(self, checkpoint)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``load_state_dict``, all or nothing: a failed load (by ``load_from_checkpoint``, a resume or directly)
        leaves the module exactly as it was."""
        with restored_on_error(self):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_train_epoch_start(self) -> None:
        self.log_resolution()

    def log_resolution(self) -> None:
        """Log the resolution per stage, the scheme's order, the parameter count and residual evaluations per
        forward; the largest step count and the evaluations are shown in the progress bar."""
        resolutions = self.model.resolution
        values = {f"resolution/n_steps_stage{i}": r.n_steps for i, r in enumerate(resolutions)}
        values.update({f"resolution/n_basis_stage{i}": r.n_basis for i, r in enumerate(resolutions)})
        values["resolution/scheme_order"] = min(get_scheme(r.scheme).order for r in resolutions)
        values["resolution/parameters"] = sum(p.numel() for p in self.model.parameters())
        for name, value in values.items():
            self.log(name, float(value), on_epoch=True, on_step=False, sync_dist=True)
        self.log("n_steps", float(max(r.n_steps for r in resolutions)), on_epoch=True, on_step=False,
                 prog_bar=True, sync_dist=True)
        self.log("nfe", float(self.model.function_evaluations), on_epoch=True, on_step=False, prog_bar=True,
                 sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer: torch.optim.Optimizer
        scheduler: torch.optim.lr_scheduler.LRScheduler
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                nesterov=hp.momentum > 0,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        if hp.lr_schedule == "cosine":
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones or []),
                                                             gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def check_checkpoint(task: BackboneTask, checkpoint: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``checkpoint`` holds another model than ``task``, naming the first difference.

    The checkpoint's ``model.*`` tensors are loaded into a copy of the task's model (refined to the checkpoint's
    resolution on the way), so a finer checkpoint of the same model passes and anything else is refused before the
    task itself is touched.

    Args:
        task: the task about to load the checkpoint.
        checkpoint: a Lightning checkpoint (``state_dict`` and ``hyper_parameters``).
    """
    state = checkpoint.get("state_dict", {})
    theirs = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    own = set(task.state_dict())
    others = sorted(key for key in state if not key.startswith(("model.", "metrics.")) and key not in own)
    problem = f"it has {others[0]}, which this model lacks" if others else None
    if problem is None:
        try:
            copy.deepcopy(task.model).load_state_dict(theirs)
        except (RuntimeError, ValueError) as error:
            problem = _first_difference(str(error))
    if problem is None:
        return
    hparams = checkpoint.get("hyper_parameters", {})

    def describe(values: Any, num_classes: Any, in_chans: Any) -> str:
        return f"{values.get('model', '?')!r} (num_classes={num_classes}, in_chans={in_chans})"

    raise ValueError(
        f"the checkpoint holds another model: {problem}; it was trained as "
        f"{describe(hparams, hparams.get('num_classes'), hparams.get('in_chans'))}, this model is "
        f"{describe(task.hparams, getattr(task, 'num_classes', None), task.in_chans)}; load it with the config it "
        "was trained with"
    )


def _first_difference(message: str) -> str:
    """The first problem named by a ``load_state_dict`` error, on one line."""
    size = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\)) from "
                     r"checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))", message)
    if size:
        theirs, ours = (shape.removeprefix("torch.Size(").removesuffix(")") for shape in size.group(2, 3))
        return f"model.{size.group(1)} has shape {theirs} in it but {ours} here"
    keys = re.search(r'(Missing|Unexpected) key\(s\) in state_dict: "([\w.]+)"', message)
    if keys:
        verb = "it lacks" if keys.group(1) == "Missing" else "it has"
        return f"{verb} model.{keys.group(2)}" + ("" if verb == "it lacks" else ", which this model lacks")
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


__all__ = ["BackboneTask", "CompiledBackbone", "DATA_ARGUMENTS", "build_backbone", "check_checkpoint",
           "compile_options"]
