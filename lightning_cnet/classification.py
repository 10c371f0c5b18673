"""Classification with a ContinuousNet, written once for both Lightning namespaces.

:class:`ClassificationTask` holds the logic of the LightningModule and uses only methods every
``LightningModule`` has (``log``, ``trainer``, ``save_hyperparameters``). The concrete classes mix it with
``pytorch_lightning.LightningModule`` (:mod:`lightning_cnet.module`) or ``lightning.pytorch.LightningModule``
(:mod:`lightning_cnet.lightning`).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_cnet._transaction import restored_on_error
from lightning_cnet._validation import TRAINING_RANGES, check_ranges
from lightning_cnet.integrators import get_scheme
from lightning_cnet.models import ContinuousNet, get_model

if TYPE_CHECKING:
    from lightning_cnet._namespace import Namespace

SPLITS = ("train", "val", "test")


class ClassificationTask:
    """Image classification with a ContinuousNet backbone (mix with a ``LightningModule`` class).

    Args:
        model: a registered model name (:func:`~lightning_cnet.models.list_models`).
        num_classes: classes to predict (default: the model's own, 10 for ``cnet_digits``).
        in_chans: input channels (default: the model's own, 1 for ``cnet_digits``).
        scheme: Runge-Kutta scheme of the ODE stages.
        n_steps: integration steps per stage.
        n_basis: basis coefficients per stage (default: ``n_steps``).
        basis: ``"piecewise_constant"`` or ``"piecewise_linear"``.
        T: physical depth of each stage (default: ``n_steps``; for a model refined during training, the step count
            of the final model).
        unit: the residual unit of the ODE stages (``"preact_basic"``, ``"bottleneck"``, a registered name).
        unit_kwargs: keyword arguments of the unit.
        skip_init: gate the residual units by ``s(t)`` initialised to zero.
        recompute_steps: recompute activations per step in backward to save memory.
        label_smoothing: cross-entropy label smoothing.
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
    """

    #: The Lightning namespace of the concrete class.
    lightning: ClassVar[Namespace]

    def __init__(
        self,
        model: str = "cnet_digits",
        *,
        num_classes: int | None = None,
        in_chans: int | None = None,
        scheme: str = "euler",
        n_steps: int = 1,
        n_basis: int | None = None,
        basis: str = "piecewise_constant",
        T: float | None = None,
        unit: str = "preact_basic",
        unit_kwargs: dict[str, Any] | None = None,
        skip_init: bool = True,
        recompute_steps: bool = False,
        label_smoothing: float = 0.0,
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
        check_ranges(TRAINING_RANGES, {"lr": lr, "label_smoothing": label_smoothing, "momentum": momentum,
                                       "weight_decay": weight_decay, "gamma": gamma, "milestones": milestones})
        self.save_hyperparameters(ignore=["backbone"])
        self._compile_options = compile_options(compile)
        self._compiled_backbone: CompiledBackbone | None = None
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={optimizer!r} is not known: expected 'sgd' or 'adamw'")
        if lr_schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"lr_schedule={lr_schedule!r} is not known: expected 'cosine', 'step' or 'constant'")
        if backbone is None:
            data_shape = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v is not None}
            backbone = get_model(
                model, scheme=scheme, n_steps=n_steps, n_basis=n_basis, basis=basis, T=T, unit=unit,
                unit_kwargs=unit_kwargs, skip_init=skip_init, recompute_steps=recompute_steps, **data_shape,
            )
        self.model: ContinuousNet = backbone
        self.num_classes = self.model.num_classes
        self.in_chans = self.model.stem.in_channels
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics, compute_groups=False)  # top-1 and top-5 must not share state
        self.metrics = nn.ModuleDict({f"{split}_metrics": collection.clone(prefix=f"{split}_") for split in SPLITS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_backbone is None:
            return self.model(x)
        return self._compiled_backbone(self.model, x)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        """Check that the model fits the data module (same ``num_classes`` and ``in_chans``), then compile the
        backbone if ``compile`` asks for it."""
        datamodule = getattr(self.trainer, "datamodule", None)
        for name, ours in (("num_classes", self.num_classes), ("in_chans", self.in_chans)):
            theirs = getattr(datamodule, name, None)
            if theirs is not None and theirs != ours:
                raise ValueError(
                    f"the model has {name}={ours} but {type(datamodule).__name__} has {name}={theirs}; "
                    f"build the model with {name}={theirs}"
                )
        if self._compile_options is not None and self._compiled_backbone is None:
            self._compiled_backbone = CompiledBackbone(self._compile_options)

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

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metrics = self.metrics[f"{split}_metrics"]
        metrics.update(logits.detach().float(), targets)
        on_step = split == "train"
        self.log(f"{split}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test", sync_dist=True)
        for name, metric in metrics.items():
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name == f"{split}_acc" and split != "test")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
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


def _call_backbone(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The function :class:`CompiledBackbone` compiles: the backbone is an argument, so that every copy of a task
    (``copy.deepcopy`` by weight-averaging callbacks) runs its own backbone through the same compiled code."""
    return model(x)


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

    Example:
        >>> from lightning_cnet.models import get_model
        >>> net = get_model("cnet_digits")
        >>> compiled = CompiledBackbone({"backend": "eager"})
        >>> compiled(net, torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)
        self._compiled = torch.compile(_call_backbone, **self.options)
        self._pieces: tuple[int, ...] | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pieces = _pieces_per_stage(model)
        if pieces != self._pieces:
            if self._pieces is not None:
                torch._dynamo.eval_frame.remove_from_cache(_call_backbone)
            self._pieces = pieces
        return self._compiled(model, x)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the compiled callable (``ddp_spawn`` pickles the task); it is rebuilt on unpickling."""
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])


def _pieces_per_stage(model: nn.Module) -> tuple[int, ...]:
    resolutions = getattr(model, "stage_resolutions", ())
    return tuple(resolution.n_basis for resolution in resolutions)


def check_checkpoint(task: ClassificationTask, checkpoint: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``checkpoint`` holds another model than ``task``, naming the first difference.

    The checkpoint's ``model.*`` tensors are loaded into a copy of the task's model (refined to the checkpoint's
    resolution on the way), so a finer checkpoint of the same model passes and anything else is refused before the
    task itself is touched.

    Args:
        task: the classifier about to load the checkpoint.
        checkpoint: a Lightning checkpoint (``state_dict`` and ``hyper_parameters``).
    """
    state = checkpoint.get("state_dict", {})
    theirs = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    others = sorted(key for key in state if not key.startswith(("model.", "metrics.")))
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
        f"{describe(task.hparams, task.num_classes, task.in_chans)}; load it with the config it was trained with"
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
