"""Semantic segmentation with a ContinuousNet, written once for both Lightning namespaces.

:class:`SegmentationTask` puts a light decoder on the feature maps of the backbone's ODE stages
(``forward_intermediates``) and adds a per-pixel cross-entropy and the mean intersection over union to
:class:`~lightning_cnet.task.BackboneTask`. The concrete classes are ``lightning_cnet.module.ContinuousNetSegmenter``
(``pytorch_lightning``) and ``lightning_cnet.lightning.ContinuousNetSegmenter`` (``lightning.pytorch``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.batches import model_input
from lightning_cnet.models import ContinuousNet
from lightning_cnet.task import BackboneTask, build_backbone

SPLITS = ("train", "val", "test")


def _feature_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature map after every ODE stage (what the task's ``compile`` compiles)."""
    maps = cast(ContinuousNet, model).forward_intermediates(x, intermediates_only=True)
    return cast(list[torch.Tensor], maps)  # with intermediates_only, the list of maps alone


class FeatureSumDecoder(nn.Module):
    """A light decoder: each stage's map projected to ``channels`` by a 1x1 convolution, upsampled to the finest map
    and summed, then BatchNorm, ReLU and a 1x1 convolution to class scores, upsampled to the image.

    Args:
        in_channels: channels of the stage maps, finest first.
        channels: channels of the summed map.
        num_classes: classes to score.

    Example:
        >>> decoder = FeatureSumDecoder([8, 16], channels=4, num_classes=3)
        >>> decoder([torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)], size=(16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(width, channels, kernel_size=1, bias=False) for width in in_channels)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        finest = maps[0].shape[-2:]
        summed = sum(_resized(lateral(m), finest) for lateral, m in zip(self.lateral, maps))
        return _resized(self.classifier(F.relu(self.norm(summed))), tuple(size))


def _resized(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@lightning_class("ContinuousNetSegmenter", base="LightningModule", home="lightning_cnet.module")
class SegmentationTask(BackboneTask):
    """Semantic segmentation with a ContinuousNet backbone (mix with a ``LightningModule`` class).

    The backbone is built without its classifier (``num_classes=0``); a :class:`FeatureSumDecoder` turns the maps of
    its ODE stages into per-pixel class scores at the image's size. Batches are ``{"image": [B, C, H, W], "mask":
    [B, H, W]}`` dicts (or ``(image, mask)`` tuples) with class indices in the mask. The loss is the per-pixel
    cross-entropy; ``{split}_loss`` and ``{split}_iou`` (the mean over classes of the intersection over union, classes
    absent from a split's predictions and masks left out) are logged per epoch. The callbacks measure ``val_iou``
    (``monitor``), the CLI keeps the checkpoint of the best one.

    Args:
        model: a registered model name (:func:`~lightning_cnet.models.list_models`).
        num_classes: classes of the masks, background included (the CLI takes it from the data).
        decoder_channels: channels of the decoder.
        ignore_index: a mask value that counts neither in the loss nor in the metric.
        **kwargs: ``model_kwargs``, ``in_chans``, the optimizer, LR schedule, ``compile`` and ``backbone`` arguments
            of :class:`~lightning_cnet.task.BackboneTask`.

    Example:
        >>> import torch
        >>> from lightning_cnet.module import ContinuousNetSegmenter
        >>> task = ContinuousNetSegmenter("cnet_digits", num_classes=11, model_kwargs={"scheme": "midpoint", "T": 2.0})
        >>> task(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 11, 32, 32])
    """

    monitor: ClassVar[str] = "val_iou"
    mode: ClassVar[str] = "max"
    backbone_function: ClassVar[Callable[[nn.Module, torch.Tensor], Any]] = staticmethod(_feature_maps)

    def __init__(
        self,
        model: str = "cnet_digits",
        *,
        num_classes: int | None = None,
        decoder_channels: int = 16,
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_integer("num_classes", num_classes, minimum=2)  # the classes of the masks, background included
        check_integer("decoder_channels", decoder_channels)
        assert num_classes is not None  # refused by check_integer
        super().__init__(model, num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.decoder = FeatureSumDecoder([info["num_chs"] for info in self.model.feature_info], decoder_channels,
                                         num_classes)
        self.metrics = nn.ModuleDict({
            f"{split}_iou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
            for split in SPLITS
        })

    def build_backbone(self, model: str, model_kwargs: dict[str, Any], *, num_classes: int | None,
                       in_chans: int | None) -> ContinuousNet:
        """The backbone without a classifier: the decoder reads its stage maps."""
        return build_backbone(model, model_kwargs, num_classes=0, in_chans=in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, num_classes, H, W]`` for images ``[B, in_chans, H, W]``."""
        scores: torch.Tensor = self.decoder(self.run_backbone(x), x.shape[-2:])
        return scores

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: Any, batch_idx: int, split: str) -> torch.Tensor:
        images = model_input(batch, self)
        masks = batch["mask"] if isinstance(batch, Mapping) else batch[1]
        if len(images) == 0:
            raise ValueError(f"{split} batch {batch_idx} has no samples (images of shape {list(images.shape)}); check "
                             "the dataset and sampler behind the DataLoader")
        scores = self(images)
        loss = F.cross_entropy(scores, masks, ignore_index=-100 if self.ignore_index is None else self.ignore_index)
        metric = cast(MulticlassJaccardIndex, self.metrics[f"{split}_iou"])
        metric.update(scores.detach().argmax(dim=1), masks)
        shown = split != "test"
        self.log(f"{split}_loss", loss, on_step=split == "train", on_epoch=True, prog_bar=shown and split == "train",
                 sync_dist=True)
        self.log(f"{split}_iou", metric, on_step=False, on_epoch=True, prog_bar=shown and split == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Per-pixel class probabilities ``[B, num_classes, H, W]``."""
        scores: torch.Tensor = self(model_input(batch, self))
        return scores.softmax(dim=1)
