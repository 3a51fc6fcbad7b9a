"""Which Mask R-CNN to build and with which weights: torchvision's, a checkpoint, the shipped
``shapes`` model, or none.

:func:`build_model` makes the model (on the CPU, in eval mode) and says what it built
(:class:`WeightsInfo`); :func:`fingerprint_weights` identifies the same weights without
building anything, for the run record and to fail fast on the driver. Checkpoints are read
with ``torch.load(weights_only=True)`` from any fsspec URI, optionally pinned by SHA-256;
their arch, category names and input sizes come from the file when it records them
(:func:`load_checkpoint`), else from :class:`segpipe.config.ModelConfig`.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import mask_rcnn
from torchvision.ops.misc import FrozenBatchNorm2d

from segpipe.config import SHIPPED_WEIGHTS, ModelConfig
from segpipe.core import tiny
from segpipe.io import read_bytes, redact, sha256_hex

log = logging.getLogger(__name__)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "maskrcnn_resnet50_fpn": mask_rcnn.maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": mask_rcnn.maskrcnn_resnet50_fpn_v2,
    tiny.ARCH: tiny.maskrcnn_tiny_fpn,
}
DEFAULT_ARCH = "maskrcnn_resnet50_fpn"
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 800, 1333  # torchvision's defaults
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
