"""Typed settings. Each dataclass is built by the CLI (or a test) and passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from segpipe.decode import DEFAULT_MAX_PIXELS

ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """How to build the detector.

    ``weights`` is one of:
      - a torchvision weights name for ``arch``: ``DEFAULT``, ``COCO_V1``, or the full
        ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` (downloaded and cached by torchvision);
      - a checkpoint path or fsspec URI (``/m.pt``, ``file:///m.pt``, ``s3://bucket/m.pt``)
        holding a state dict, loaded with ``torch.load(weights_only=True)``;
      - ``none``: random initialisation. Output is meaningless; for plumbing tests only.

    The thresholds and sizes default to torchvision's own defaults, so the detector behaves
    exactly as ``torchvision.models.detection.<arch>(weights=...)`` does.
    """

    arch: str = "maskrcnn_resnet50_fpn"
    weights: str = "DEFAULT"
    # Expected SHA-256 (hex) of a checkpoint file; a mismatch refuses to load it.
    weights_sha256: str | None = None
    # Category names for a non-COCO checkpoint that carries none: a JSON list of names, a COCO
    # "categories" list of {"id", "name"} objects, or a text file with one name per line.
    categories: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    min_size: int = 800  # short side the model rescales each image to
    max_size: int = 1333  # cap on the long side after rescaling
    score_threshold: float = 0.05  # drop detections scoring below this (box_score_thresh)
    mask_threshold: float = 0.5  # a mask pixel is set where its probability is > this
    max_detections: int = 100  # keep at most this many detections per image

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(
                f"need 0 < min_size <= max_size, got min_size={self.min_size}, "
                f"max_size={self.max_size}"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1), got {self.mask_threshold}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")


@dataclass(frozen=True)
class DecodeConfig:
    """How to turn bytes into pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
