"""The detector: build Mask R-CNN once, then run it on batches of decoded images.

Contract of :class:`Segmenter` (one instance per worker; the model is loaded in ``__init__``):

- Input: a sequence of RGB images, each ``numpy.uint8`` of shape ``(H, W, 3)``; sizes may
  differ within a batch. They are scaled to 0..1 floats, as torchvision expects; the model's
  own transform then normalises and rescales them (short side ``min_size``, long side at most
  ``max_size``) and maps its results back to the input's pixel grid.
- Weights: built once by :func:`segpipe.core.weights.build_model`.
- Output: one :class:`Detections` per image, in input order, sorted by descending score,
  at most ``max_detections`` of them, each scoring at least ``score_threshold``.
- Masks: torchvision pastes each detection's 28x28 mask into an image-sized canvas (100
  detections on an 800x1066 image: 340 MB of float32 written, then copied off the GPU).
  :meth:`Segmenter.__call__` runs the model's parts itself and stops before that paste: each
  mask is resized into its (enlarged) box exactly as torchvision's paste does, thresholded
  there, and kept as that window (:class:`Detections`), which is pixel for pixel the crop of
  torchvision's pasted mask. All windows of a batch leave the device in one copy.
- The score threshold applies before the mask head: torchvision's ``RoIHeads`` keeps the
  boxes scoring at least ``box_score_thresh`` (and the top ``max_detections``) before it
  runs the mask branch, so masks are computed only for detections that are returned.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes

from segpipe.config import FP16_ON_CPU, ModelConfig
from segpipe.core.detections import Detections
from segpipe.core.weights import build_model

log = logging.getLogger(__name__)

# The least a short side may become after the model's rescaling; thinner images are padded.
MIN_RESCALED_SIDE = 8


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` insists on a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible")
    return torch.device(name)


class _Float32(nn.Module):
    """``inner`` run in float32 with autocast off, whatever the caller's precision."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        device = next(self.inner.parameters()).device.type
        with torch.autocast(device, enabled=False):
            return self.inner(*(_as_float32(a) for a in args))


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, list | tuple):
        return type(value)(_as_float32(v) for v in value)
    return value


def _keep_geometry_float32(model: Any) -> None:
    """Under bf16/fp16 autocast, keep coordinates in float32. torchvision makes anchors in
    the feature maps' dtype and decodes boxes in the regression outputs' dtype, and bf16
    holds 8 significant bits (x = 1000 would move in steps of 8 pixels). So the layers that
    regress boxes (the RPN's 1x1 box convolution, the box predictor's two linear layers:
    a small share of the compute) run in float32, the anchor generator sees float32 feature
    maps (zero-copy stand-ins of the same shape), and the heads' other outputs are cast to
    float32; the backbone, FPN and heads' inner layers stay in reduced precision."""

    def outputs_float(_module: nn.Module, _args: Any, output: Any) -> Any:
        return _as_float32(output)

    def anchors_from_float(_module: nn.Module, args: Any) -> Any:
        image_list, feature_maps = args
        stand_ins = [
            torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape)
            for f in feature_maps
        ]
        return image_list, stand_ins

    model.rpn.head.bbox_pred = _Float32(model.rpn.head.bbox_pred)
    model.roi_heads.box_predictor = _Float32(model.roi_heads.box_predictor)
    model.rpn.anchor_generator.register_forward_pre_hook(anchors_from_float)
    for head in (model.rpn.head, model.roi_heads.mask_predictor):
        head.register_forward_hook(outputs_float)


def output_frame(
    tensor: torch.Tensor, image_size: tuple[int, int], size: tuple[int, int]
) -> tuple[float, float]:
    """The extent of ``tensor`` (an image of ``image_size``, perhaps padded at its far edges)
    in the coordinates of an image of ``size``: the same scale on the padding."""
    (th, tw), (h, w) = (int(tensor.shape[-2]), int(tensor.shape[-1])), image_size
    if (th, tw) == (h, w):
        return float(size[0]), float(size[1])
    return th * size[0] / h, tw * size[1] / w


class Segmenter:
    """Mask R-CNN loaded once; call it on a batch of RGB uint8 images."""

    def __init__(self, cfg: ModelConfig) -> None:
        started = time.perf_counter()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.precision == "fp16" and self.device.type == "cpu":
            raise ValueError(FP16_ON_CPU)
        model, self.weights = build_model(cfg)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if cfg.precision != "fp32":
            _keep_geometry_float32(self.model)
        if cfg.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.categories = self.weights.categories
        log.info(
            "loaded %s (%s weights %s) on %s (%s%s) in %.1f s",
            self.weights.arch,
            self.weights.kind,
            self.weights.name,
            self.device,
            cfg.precision,
            ", channels-last" if cfg.channels_last else "",
            time.perf_counter() - started,
        )

    def __call__(
        self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[Detections]:
        """Detections of RGB uint8 ``(h, w, 3)`` images, in the coordinates of images of
        ``sizes`` (``(height, width)`` each; default: the images' own). An image decoded
        smaller than its size (at the model's scale) gets boxes and mask windows at full
        resolution: boxes scaled by ``height / h`` and ``width / w``, masks pasted into
        those boxes."""
        if not images:
            return []
        own = [(int(i.shape[0]), int(i.shape[1])) for i in images]
        sizes = list(sizes) if sizes is not None else own
        tensors = [self.to_tensor(image) for image in images]
        frames = [
            output_frame(tensor, image_size, size)
            for tensor, image_size, size in zip(tensors, own, sizes, strict=True)
        ]
        return self.detect(tensors, sizes, frames)

    def detect(
        self,
        tensors: list[torch.Tensor],
        sizes: Sequence[tuple[int, int]] | None = None,
        frames: Sequence[tuple[float, float]] | None = None,
    ) -> list[Detections]:
        """The model on float ``(3, H, W)`` tensors in 0..1, already on the device; detections
        for images of ``sizes`` (default: the tensors' sizes; less where padded), on the host.
        ``frames``: each tensor's extent in the coordinates of ``sizes`` (default: the
        tensor's own size: one tensor pixel is one output pixel)."""
        if sizes is None:
            sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        with torch.inference_mode(), self._autocast():
            outputs = self._forward(tensors, frames)
            return self._detections(outputs, list(sizes))

    def _autocast(self) -> torch.autocast:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(
            self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )

    def _forward(
        self, tensors: list[torch.Tensor], frames: Sequence[tuple[float, float]] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """``GeneralizedRCNN.forward`` in eval mode without its mask paste: boxes in the
        coordinates of ``frames`` (default: input pixels), ``masks`` still the mask head's
        (N, 1, 28, 28) probabilities."""
        model: Any = self.model  # a GeneralizedRCNN
        original_sizes = frames or [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        images, _ = model.transform(tensors)
        if self.cfg.channels_last:
            images.tensors = images.tensors.contiguous(memory_format=torch.channels_last)
        features = model.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(images, features)
        outputs, _ = model.roi_heads(features, proposals, images.image_sizes)
        for out, resized, original in zip(outputs, images.image_sizes, original_sizes, strict=True):
            out["boxes"] = resize_boxes(out["boxes"], list(resized), list(original))
        return list(outputs)

    def _detections(
        self, outputs: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Boxes clipped to the image and each mask as its thresholded window. The whole
        batch's boxes, labels, scores and window pixels leave the device in one copy each."""
        counts = [int(out["scores"].shape[0]) for out in outputs]
        boxes = torch.cat([out["boxes"] for out in outputs]).float()
        probs, scale = expand_masks(torch.cat([out["masks"] for out in outputs]).float(), 1)
        pasted = expand_boxes(boxes, scale).to(torch.int64).tolist()
        image_sizes = [size for size, n in zip(sizes, counts, strict=True) for _ in range(n)]
        windows: list[torch.Tensor] = []
        placed: list[tuple[int, int, int, int]] = []  # per detection: x, y, w, h
        for prob, (bx0, by0, bx1, by1), (height, width) in zip(
            probs, pasted, image_sizes, strict=True
        ):
            # torchvision's paste_mask_in_image, clipped to the image instead of pasted.
            resized = functional.interpolate(
                prob[None],
                size=(max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1)),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            x0, y0 = min(max(bx0, 0), width), min(max(by0, 0), height)
            x1, y1 = max(min(bx1 + 1, width), x0), max(min(by1 + 1, height), y0)
            window = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
            windows.append(window.reshape(-1) > self.cfg.mask_threshold)
            placed.append((x0, y0, x1 - x0, y1 - y0))
        pixels = torch.cat(windows).cpu().numpy() if windows else np.zeros(0, dtype=bool)
        host_boxes = boxes.cpu().numpy()
        labels = torch.cat([out["labels"] for out in outputs]).to(torch.int64).cpu().numpy()
        scores = torch.cat([out["scores"] for out in outputs]).float().cpu().numpy()
        result, first, start = [], 0, 0
        for n, (height, width) in zip(counts, sizes, strict=True):
            masks = []
            for _, _, w, h in placed[first : first + n]:
                masks.append(pixels[start : start + w * h].reshape(h, w))
                start += w * h
            limits = np.array([width, height, width, height], dtype=np.float32)
            origins = [(x, y) for x, y, _, _ in placed[first : first + n]]
            result.append(
                Detections(
                    boxes=np.minimum(host_boxes[first : first + n], limits),
                    labels=labels[first : first + n],
                    scores=scores[first : first + n],
                    masks=masks,
                    mask_origins=np.array(origins, dtype=np.int32).reshape(-1, 2),
                    image_size=(height, width),
                )
            )
            first += n
        return result

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """An RGB uint8 ``(H, W, 3)`` image as the float ``(3, H, W)`` tensor in 0..1 on the
        device that :meth:`detect` takes (a very thin image padded, see :meth:`_pad_thin`)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; the tensor is never written to
            # (.float() below makes the copy the model reads), so no defensive copy is needed.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            tensor = torch.from_numpy(image)
        tensor = tensor.to(self.device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)
        return self._pad_thin(tensor)

    def _pad_thin(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pad a very thin image (a 10000x10 strip) with black at its bottom or right edge, so
        that the model's rescaling (long side capped at ``max_size``) leaves its short side
        at least :data:`MIN_RESCALED_SIDE` pixels instead of zero. Padding at the far edges
        keeps every coordinate; :meth:`_detections` crops back to the image."""
        height, width = int(tensor.shape[1]), int(tensor.shape[2])
        max_size = self.weights.max_size
        need = math.ceil(MIN_RESCALED_SIDE * max(height, width) / max_size)
        if min(height, width) >= need:
            return tensor
        pad_right = max(0, need - width) if width < height else 0
        pad_bottom = max(0, need - height) if height <= width else 0
        return torch.nn.functional.pad(tensor, (0, pad_right, 0, pad_bottom))
