"""The detector: build Mask R-CNN once, then run it on batches of decoded images.

Contract of :class:`Segmenter` (one instance per worker; the model is loaded in ``__init__``):

- Input: a sequence of RGB images, each ``numpy.uint8`` of shape ``(H, W, 3)``; sizes may
  differ within a batch. They are scaled to 0..1 floats, as torchvision expects; the model's
  own transform then normalises and rescales them (short side ``min_size``, long side at most
  ``max_size``) and maps its results back to the input's pixel grid.
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

import io
import json
import logging
import math
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torchvision.models.detection import mask_rcnn
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops.misc import FrozenBatchNorm2d

from segpipe.config import FP16_ON_CPU, ModelConfig
from segpipe.core import tiny
from segpipe.core.detections import Detections
from segpipe.io import read_bytes, redact, sha256_hex

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "maskrcnn_resnet50_fpn": mask_rcnn.maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": mask_rcnn.maskrcnn_resnet50_fpn_v2,
    tiny.ARCH: tiny.maskrcnn_tiny_fpn,
}
DEFAULT_ARCH = "maskrcnn_resnet50_fpn"
# The least a short side may become after the model's rescaling; thinner images are padded.
MIN_RESCALED_SIDE = 8
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 800, 1333  # torchvision's defaults
# Checkpoints shipped inside the package, by the name ``--weights`` takes.
SHIPPED_WEIGHTS = {"shapes": "weights/shapes.pt"}
_WEIGHTS_ENUMS: dict[str, Any] = {
    "maskrcnn_resnet50_fpn": mask_rcnn.MaskRCNN_ResNet50_FPN_Weights,
    "maskrcnn_resnet50_fpn_v2": mask_rcnn.MaskRCNN_ResNet50_FPN_V2_Weights,
}
COCO_CATEGORIES: tuple[str, ...] = tuple(
    mask_rcnn.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
)
BACKGROUND = "__background__"
# torchvision zeroes BatchNorm eps for its legacy v1 COCO weights; the same file loaded as a
# checkpoint gets the same treatment (recognised by the SHA-256 prefix in its file name).
_TORCHVISION_V1_COCO_SHA256_PREFIX = "bf2d0c1e"
_CLASS_WEIGHT_KEY = "roi_heads.box_predictor.cls_score.weight"


class WeightsError(ValueError):
    """The weights cannot be used: missing, corrupt, wrong hash or not for this arch."""


@dataclass(frozen=True)
class WeightsInfo:
    """What was built and where its weights came from, for the run record and the logs (no
    secrets)."""

    kind: str  # "torchvision" | "checkpoint" | "none"
    name: str  # weights enum name, redacted URI, or the name of shipped weights
    sha256: str | None
    categories: tuple[str, ...]
    arch: str
    min_size: int
    max_size: int


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


def shipped_weights(name: str) -> str | None:
    """The path of checkpoint ``name`` shipped inside the package (``shapes``), else None."""
    file = SHIPPED_WEIGHTS.get(name)
    if file is None:
        return None
    path = resources.files("segpipe").joinpath(file)
    if not path.is_file():
        raise WeightsError(f"the shipped checkpoint {name!r} is missing from this install ({file})")
    return str(path)


def _source(weights: str) -> str:
    """Where to read checkpoint ``weights`` from: shipped weights by name, else the URI."""
    return shipped_weights(weights) or weights


def _shown(weights: str) -> str:
    return weights if weights in SHIPPED_WEIGHTS else redact(weights)


def _arch(cfg: ModelConfig, recorded: str | None = None) -> str:
    """The arch to build: the configured one, else the checkpoint's, else the default."""
    if cfg.arch == "auto":
        return recorded or DEFAULT_ARCH
    if recorded is not None and recorded != cfg.arch:
        raise WeightsError(
            f"checkpoint {_shown(cfg.weights)} was saved for arch {recorded!r}, not {cfg.arch!r}"
        )
    return cfg.arch


def _sizes(cfg: ModelConfig, recorded: Mapping[str, Any] | None = None) -> tuple[int, int]:
    recorded = recorded or {}
    min_size = cfg.min_size or int(recorded.get("min_size", DEFAULT_MIN_SIZE))
    max_size = cfg.max_size or int(recorded.get("max_size", DEFAULT_MAX_SIZE))
    if min_size > max_size:
        raise ValueError(f"need min_size <= max_size, got {min_size} > {max_size}")
    return min_size, max_size


@dataclass(frozen=True)
class _Resolved:
    """What ``cfg`` names, once: torchvision weights or a checkpoint (or neither, for
    ``none``), and the arch and input sizes they and ``cfg`` settle on."""

    member: Any  # torchvision weights enum member, or None
    checkpoint: Checkpoint | None
    arch: str
    min_size: int
    max_size: int


def _resolve(cfg: ModelConfig) -> _Resolved:
    member, checkpoint = None, None
    if cfg.weights.lower() != "none":
        member = _torchvision_weights(_arch(cfg), cfg.weights)
        if member is None:
            checkpoint = load_checkpoint(_source(cfg.weights), expected_sha256=cfg.weights_sha256)
    arch = _arch(cfg, checkpoint.arch if checkpoint else None)
    min_size, max_size = _sizes(cfg, checkpoint.transform if checkpoint else None)
    return _Resolved(member, checkpoint, arch, min_size, max_size)


def build_model(cfg: ModelConfig) -> tuple[nn.Module, WeightsInfo]:
    """The Mask R-CNN for ``cfg`` on the CPU, in eval mode, and a description of it."""
    r = _resolve(cfg)
    builder = partial(
        _BUILDERS[r.arch],
        min_size=r.min_size,
        max_size=r.max_size,
        box_score_thresh=cfg.score_threshold,
        box_detections_per_img=cfg.max_detections,
    )
    described = partial(WeightsInfo, arch=r.arch, min_size=r.min_size, max_size=r.max_size)
    if r.member is not None:
        try:
            model = builder(weights=r.member, progress=False)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise WeightsError(
                f"could not fetch torchvision weights {r.member} from {r.member.url}: "
                f"{exc}. Without internet access, copy that file to storage you can reach "
                "and pass its path or URI as the weights."
            ) from exc
        categories = tuple(r.member.meta["categories"])
        info = described("torchvision", str(r.member), None, categories)
    elif r.checkpoint is not None:
        checkpoint = r.checkpoint
        model, categories = _from_checkpoint(cfg, checkpoint, r.arch, builder)
        if r.arch == "maskrcnn_resnet50_fpn" and checkpoint.sha256.startswith(
            _TORCHVISION_V1_COCO_SHA256_PREFIX
        ):
            _zero_batchnorm_eps(model)
        info = described("checkpoint", _shown(cfg.weights), checkpoint.sha256, categories)
    else:
        log.warning(
            "weights=none: %s is RANDOMLY INITIALISED. Its detections are meaningless; use "
            "this only to test plumbing.",
            r.arch,
        )
        model = builder(weights=None, weights_backbone=None)
        info = described("none", "none", None, COCO_CATEGORIES)
    model.eval()
    return model, info


def fingerprint_weights(cfg: ModelConfig) -> dict[str, Any]:
    """Identify the weights and what they build without building the model: for a run
    record, and to fail fast (unknown name, missing or unreadable checkpoint, wrong pin, arch
    mismatch) before any cluster work starts."""
    r = _resolve(cfg)
    found: dict[str, Any]
    if r.member is not None:
        found = {"kind": "torchvision", "name": str(r.member), "url": r.member.url, "sha256": None}
    elif r.checkpoint is not None:
        _check_fits(cfg, r.checkpoint, r.arch)
        found = {"kind": "checkpoint", "name": _shown(cfg.weights), "sha256": r.checkpoint.sha256}
    else:
        found = {"kind": "none", "name": "none", "sha256": None}
    return {**found, "arch": r.arch, "min_size": r.min_size, "max_size": r.max_size}


def _check_pin(uri: str, digest: str, expected: str | None) -> None:
    if expected is not None and digest != expected.strip().lower():
        raise WeightsError(
            f"checkpoint {redact(uri)} has SHA-256 {digest}, but {expected} was required "
            "(weights_sha256); refusing to load it"
        )


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    categories: list[str] | None
    arch: str | None
    transform: dict[str, int] | None  # the min_size / max_size it was trained at
    sha256: str


def load_checkpoint(uri: str, *, expected_sha256: str | None = None) -> Checkpoint:
    """Read a checkpoint from a path or fsspec URI with ``torch.load(weights_only=True)``.

    Accepted layouts: a bare state dict, or a dict with the state dict under ``model`` (or
    ``state_dict``) and optionally ``categories`` (list of names, index = label id) and
    ``arch`` (one of the builder names) and ``transform`` (``{"min_size", "max_size"}``).
    """
    shown = redact(uri)
    try:
        data = read_bytes(uri)
    except FileNotFoundError as exc:
        raise WeightsError(f"checkpoint not found: {shown}") from exc
    except Exception as exc:
        raise WeightsError(
            f"could not read checkpoint {shown}: {type(exc).__name__}: {exc}"
        ) from exc
    digest = sha256_hex(data)
    _check_pin(uri, digest, expected_sha256)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"could not load checkpoint {shown} with torch.load(weights_only=True): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint {shown} holds a {type(obj).__name__}, not a state dict")
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"checkpoint {shown} holds no state dict of tensors")
    categories = obj.get("categories") if state is not obj else None
    arch = obj.get("arch") if state is not obj else None
    if arch is not None and arch not in _BUILDERS:
        raise WeightsError(
            f"checkpoint {shown} records arch {arch!r}, which is none of {', '.join(_BUILDERS)}"
        )
    transform = obj.get("transform") if state is not obj else None
    if transform is not None and not (
        isinstance(transform, Mapping)
        and all(isinstance(transform.get(k, 1), int) for k in ("min_size", "max_size"))
    ):
        raise WeightsError(f"checkpoint {shown} has a malformed transform entry: {transform!r}")
    return Checkpoint(
        state_dict=dict(state),
        categories=[str(c) for c in categories] if categories is not None else None,
        arch=str(arch) if arch is not None else None,
        transform=dict(transform) if transform is not None else None,
        sha256=digest,
    )


def load_categories(uri: str) -> list[str]:
    """Category names from a side file: a JSON list of names, a COCO ``categories`` list
    (``[{"id": 1, "name": "cat"}, ...]``, also inside a whole COCO dataset file), or text
    with one name per line. Index in the returned list = label id."""
    text = read_bytes(uri).decode("utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(obj, dict) and "categories" in obj:
        obj = obj["categories"]
    if isinstance(obj, list) and all(isinstance(c, str) for c in obj):
        return list(obj)
    if isinstance(obj, list) and all(isinstance(c, dict) and "id" in c for c in obj):
        names = [f"class_{i}" for i in range(max(int(c["id"]) for c in obj) + 1)]
        names[0] = BACKGROUND
        for c in obj:
            names[int(c["id"])] = str(c["name"])
        return names
    raise WeightsError(f"cannot read category names from {redact(uri)}")


def _torchvision_weights(arch: str, weights: str) -> Any:
    """The torchvision weights enum member that ``weights`` names for ``arch``, or None if it
    names none (then it is a checkpoint URI, or ``none``)."""
    if (
        "/" in weights
        or weights.endswith((".pt", ".pth", ".bin", ".ckpt"))
        or weights in SHIPPED_WEIGHTS
    ):
        return None
    enum = _WEIGHTS_ENUMS.get(arch)
    if enum is None:
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", weights):
            raise WeightsError(
                f"{arch} has no torchvision weights; give a checkpoint path or URI, "
                f"{' or '.join(SHIPPED_WEIGHTS)}, or 'none'"
            )
        return None
    member_name = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    if member_name in enum.__members__:
        return enum[member_name]
    for other_arch, other in _WEIGHTS_ENUMS.items():
        if other is not enum and weights.startswith(other.__name__ + "."):
            raise WeightsError(f"weights {weights} are for {other_arch}, not {arch}")
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", weights):
        raise WeightsError(
            f"{weights!r} is not a torchvision weights name for {arch}; choose one of "
            f"{', '.join(enum.__members__)}, a checkpoint path or URI, or 'none'"
        )
    return None


def _num_classes(state_dict: Mapping[str, torch.Tensor], uri: str) -> int:
    weight = state_dict.get(_CLASS_WEIGHT_KEY)
    if weight is None:
        raise WeightsError(
            f"checkpoint {redact(uri)} is not a Mask R-CNN state dict (no {_CLASS_WEIGHT_KEY})"
        )
    return int(weight.shape[0])


def _category_names(names: Sequence[str] | None, num_classes: int, uri: str) -> tuple[str, ...]:
    if names is None:
        if num_classes == len(COCO_CATEGORIES):
            return COCO_CATEGORIES
        raise WeightsError(
            f"checkpoint {redact(uri)} predicts {num_classes} classes but carries no category "
            "names; pass a categories file (JSON list, COCO categories, or one name per line)"
        )
    if len(names) == num_classes - 1:  # names without the background class
        names = [BACKGROUND, *names]
    if len(names) != num_classes:
        raise WeightsError(
            f"{len(names)} category names given for a model with {num_classes} classes "
            "(index 0 is the background)"
        )
    return tuple(names)


def _load_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    weights: str,
    arch: str,
    assign: bool = False,
) -> None:
    """Strict load, except for BatchNorm's ``num_batches_tracked`` counters, which torchvision's
    trained models (frozen batch norm) don't have and freshly built ones do."""
    try:
        result = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as exc:  # shape mismatch
        raise WeightsError(f"checkpoint {_shown(weights)} does not fit {arch}: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint {_shown(weights)} does not fit {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def _check_fits(cfg: ModelConfig, checkpoint: Checkpoint, arch: str) -> None:
    """Load the checkpoint into the arch's skeleton built on the meta device (no memory, no
    arithmetic; 0.04 s for R50-FPN): a state dict that does not fit the arch, or category names
    that do not match its class count, fail here on the driver, before any worker starts."""
    with torch.device("meta"):
        _from_checkpoint(cfg, checkpoint, arch, _BUILDERS[arch], assign=True)


def _from_checkpoint(
    cfg: ModelConfig,
    checkpoint: Checkpoint,
    arch: str,
    builder: Callable[..., nn.Module],
    assign: bool = False,
) -> tuple[nn.Module, tuple[str, ...]]:
    """The model ``builder`` makes, with the checkpoint's weights, and its category names
    (the checkpoint's, or ``cfg.categories``'s), checked against its class count."""
    num_classes = _num_classes(checkpoint.state_dict, cfg.weights)
    names = load_categories(cfg.categories) if cfg.categories else checkpoint.categories
    categories = _category_names(names, num_classes, cfg.weights)
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes)
    _load_state_dict(model, checkpoint.state_dict, cfg.weights, arch, assign=assign)
    return model, categories


def _zero_batchnorm_eps(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d):
            module.eps = 0.0


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

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        tensors = [self.to_tensor(image) for image in images]
        return self.detect(tensors, [(int(i.shape[0]), int(i.shape[1])) for i in images])

    def detect(
        self, tensors: list[torch.Tensor], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[Detections]:
        """The model on float ``(3, H, W)`` tensors in 0..1, already on the device; detections
        for images of ``sizes`` (default: the tensors' sizes; less where padded), on the host."""
        if sizes is None:
            sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        with torch.inference_mode(), self._autocast():
            outputs = self._forward(tensors)
            return self._detections(outputs, list(sizes))

    def _autocast(self) -> torch.autocast:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return torch.autocast(
            self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )

    def _forward(self, tensors: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """``GeneralizedRCNN.forward`` in eval mode without its mask paste: boxes in input
        pixels, ``masks`` still the mask head's (N, 1, 28, 28) probabilities."""
        model: Any = self.model  # a GeneralizedRCNN
        original_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
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
