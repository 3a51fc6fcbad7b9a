"""``maskrcnn_tiny_fpn``: torchvision's ``MaskRCNN`` on a light backbone, small enough to
train from scratch on a CPU and to ship in the repository (1.5 M parameters, 5.9 MB).

- Backbone: five stride-2 stages of 3x3 conv + BatchNorm + ReLU (widths 16-32-48-64-96),
  FPN on the stride 8, 16 and 32 outputs (64 channels) plus max-pooled stride 64.
- One anchor size per level (16, 32, 64, 128 px), aspect ratios 0.5, 1 and 2.
- Box head: two fully connected layers of 256 on 7x7 RoIAlign features.
- Mask head: four 3x3 convs of 64 channels on 14x14 features, 28x28 mask logits per class.

Everything else (RPN, RoI sampling, post-processing, the resize transform) is torchvision's,
so the model takes and returns exactly what the ResNet-50 Mask R-CNN does.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

ARCH = "maskrcnn_tiny_fpn"
WIDTHS = (16, 32, 48, 64, 96)
FPN_CHANNELS = 64
ANCHOR_SIZES = ((16,), (32,), (64,), (128,))


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyFPNBackbone(nn.Module):
    """Image batch -> ordered dict of FPN feature maps ``'0'`` (stride 8) ... ``'pool'``."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, *WIDTHS)
        self.stages = nn.ModuleList(_stage(widths[i], widths[i + 1]) for i in range(len(WIDTHS)))
        self.fpn = FeaturePyramidNetwork(
            list(WIDTHS[2:]), FPN_CHANNELS, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 2:
                features[str(i - 2)] = x
        return dict(self.fpn(features))


def maskrcnn_tiny_fpn(
    *,
    weights: Any = None,
    weights_backbone: Any = None,
    num_classes: int = 4,
    **kwargs: Any,
) -> MaskRCNN:
    """The model, randomly initialised (there are no downloadable weights for it)."""
    if weights is not None or weights_backbone is not None:
        raise ValueError(f"{ARCH} has no pretrained weights to download; load a checkpoint")
    levels = ["0", "1", "2"]
    anchors = AnchorGenerator(ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    box_roi_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
    mask_roi_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2)
    return MaskRCNN(
        TinyFPNBackbone(),
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=box_roi_pool,
        box_head=TwoMLPHead(FPN_CHANNELS * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_roi_pool=mask_roi_pool,
        mask_head=MaskRCNNHeads(FPN_CHANNELS, (64, 64, 64, 64), 1),
        mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
        **kwargs,
    )
