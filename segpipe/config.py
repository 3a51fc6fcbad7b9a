"""Typed settings. Each dataclass is built by the CLI (or a test) and passed down explicitly."""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_tiny_fpn")
# ``auto``: the arch a checkpoint records, else the first of ARCHS.
ARCH_CHOICES = ("auto", *ARCHS)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# 50 megapixels: an 8660x5773 photo. Mask R-CNN rescales to a short side of 800 anyway; larger
# inputs cost memory (3 bytes a pixel decoded, 12 as a float tensor) without adding detail.
DEFAULT_MAX_PIXELS = 50_000_000
FP16_ON_CPU = (
    "precision fp16 is for GPUs: on a CPU, fp16 autocast runs R50-FPN many times slower than "
    "bf16; use bf16 (or fp32) there"
)
# Low-cardinality columns it makes sense to make folders of. ``label`` partitions only the
# instances table; ``status`` only the images table.
PARTITION_COLUMNS = ("run_id", "label", "label_id", "status")


@dataclass(frozen=True)
class ModelConfig:
    """How to build the detector.

    ``weights`` is one of:
      - a torchvision weights name for ``arch``: ``DEFAULT``, ``COCO_V1``, or the full
        ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` (downloaded and cached by torchvision);
      - a checkpoint path or fsspec URI (``/m.pt``, ``file:///m.pt``, ``s3://bucket/m.pt``)
        holding a state dict, loaded with ``torch.load(weights_only=True)``;
      - ``shapes``: the checkpoint shipped in the package (``maskrcnn_tiny_fpn`` trained on the
        generated shapes dataset, classes circle/square/triangle; see ``jobs/train_shapes.py``);
      - ``none``: random initialisation. Output is meaningless; for plumbing tests only.

    The thresholds and sizes default to torchvision's own defaults, so the detector behaves
    exactly as ``torchvision.models.detection.<arch>(weights=...)`` does. ``arch="auto"`` and
    unset sizes take what a checkpoint records (its ``arch`` and ``transform``), else
    ``maskrcnn_resnet50_fpn`` at 800/1333.
    """

    arch: str = "auto"
    weights: str = "DEFAULT"
    # Expected SHA-256 (hex) of a checkpoint file; a mismatch refuses to load it.
    weights_sha256: str | None = None
    # Category names for a non-COCO checkpoint that carries none: a JSON list of names, a COCO
    # "categories" list of {"id", "name"} objects, or a text file with one name per line.
    categories: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    min_size: int | None = None  # short side the model rescales each image to (800)
    max_size: int | None = None  # cap on the long side after rescaling (1333)
    score_threshold: float = 0.05  # drop detections scoring below this (box_score_thresh)
    mask_threshold: float = 0.5  # a mask pixel is set where its probability is > this
    max_detections: int = 100  # keep at most this many detections per image
    # Speed levers, measured in BENCHMARKS.md: run the model under bf16/fp16 autocast (box
    # and mask geometry stays float32), with channels-last convolutions, with cuDNN autotuning.
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCH_CHOICES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError(FP16_ON_CPU)
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        for name in ("min_size", "max_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if (
            self.min_size is not None
            and self.max_size is not None
            and self.min_size > self.max_size
        ):
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


RUN_ID_PATTERN = r"[A-Za-z][A-Za-z0-9._-]{0,127}"
DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_output_uri(uri: str) -> None:
    """Refuse output URIs that would leak credentials or write somewhere unexpected: user
    info or a query string (credentials belong to the provider chain, not the URI), and
    ``..`` segments (the output must be a plain location; nothing is written above it)."""
    _, sep, rest = uri.partition("://")
    path = rest if sep else uri
    if sep and "@" in path.split("/", 1)[0]:
        raise ValueError(
            "the output URI must not hold credentials (user:secret@...); "
            "use the storage's provider chain (environment, profile, instance role)"
        )
    if sep and ("?" in path or "#" in path):
        raise ValueError("the output URI must not have a query string or fragment")
    if ".." in path.replace("\\", "/").split("/"):
        raise ValueError("the output URI must not contain '..' segments")


@dataclass(frozen=True)
class RunConfig:
    """One ``segpipe run``: where images come from, where rows go, and how work is spread.

    Exactly one of ``inputs`` (prefixes, folders or globs on any fsspec filesystem) and
    ``manifest`` (a Parquet, CSV or text file of image URIs) is set.
    """

    output: str
    inputs: tuple[str, ...] = ()
    manifest: str | None = None
    # Manifest column that holds the image URIs (Parquet/CSV); text manifests have one per line.
    uri_column: str = "uri"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    run_id: str | None = None  # default: run-<UTC timestamp>
    model: ModelConfig = ModelConfig()
    decode: DecodeConfig = DecodeConfig()
    batch_size: int = 4  # images per model call
    load_batch_size: int = 16  # images per read+decode task
    min_actors: int = 1
    max_actors: int | None = None  # default: one per GPU, or min_actors without GPUs
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    # Threads torch uses in each model actor on CPU; default: what Ray sets, cpus_per_actor.
    # On a CPU-only node whose decoding is light, all of the node's cores pay (Benchmarks).
    torch_threads: int | None = None
    partition_by: tuple[str, ...] = ("run_id",)
    images_per_file: int = 5000  # rows per images file; instances files hold their detections
    # An existing run of the same id: finish it (skip committed images) or replace it.
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if bool(self.inputs) == (self.manifest is not None):
            raise ValueError("give either input URIs or a manifest, not both and not neither")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if (self.resume or self.overwrite) and self.run_id is None:
            raise ValueError("--resume and --overwrite need the --run-id of the run to act on")
        if not self.output:
            raise ValueError("an output URI is required")
        check_output_uri(self.output)
        if self.run_id is not None and not re.fullmatch(RUN_ID_PATTERN, self.run_id):
            raise ValueError(
                f"run id {self.run_id!r} must start with a letter and hold only letters, digits, "
                "'.', '_' and '-' (at most 128 characters)"
            )
        for name in ("batch_size", "load_batch_size", "min_actors", "images_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        allowed = set(PARTITION_COLUMNS)
        bad = [c for c in self.partition_by if c not in allowed]
        if bad:
            raise ValueError(
                f"cannot partition by {bad}; choose from {', '.join(sorted(allowed))} (or none)"
            )


@dataclass(frozen=True)
class BenchConfig:
    """One ``segpipe bench`` (see :mod:`segpipe.tools.benchmark`)."""

    device: str = "auto"
    arch: str = "maskrcnn_resnet50_fpn"
    weights: str = "none"
    width: int = 640
    height: int = 480
    batch_size: int = 1
    detections: int = 20
    images: int = 8
    scale: int = 10  # the scaling run uses images * scale; 1 skips it
    bare_seconds: float = 20.0  # time the bare model over at least this long (and 3 rounds)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # 0: the pipeline's default (1 when there are GPUs); 0.5: two
    torch_threads: int = 0  # the pipeline's model actor; 0: as many as the bare model uses
    precision: str = "fp32"  # the model's levers, in both the bare model and the pipeline
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "height", "batch_size", "detections", "images", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
