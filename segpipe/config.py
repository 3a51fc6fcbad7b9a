"""Typed settings. Each dataclass is built by the CLI (or a test) and passed down explicitly.

Each setting is declared once, here: its type, default and validation, and in its field's
metadata (:func:`flag`) the help text and shape of its command-line flag. ``segpipe run`` and
``segpipe bench`` generate their flags from these fields (see ``segpipe.cli``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_tiny_fpn")
# ``auto``: the arch a checkpoint records, else the first of ARCHS.
ARCH_CHOICES = ("auto", *ARCHS)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
# 50 megapixels: an 8660x5773 photo. Mask R-CNN rescales to a short side of 800 anyway; larger
# inputs cost memory (3 bytes a pixel decoded, 12 as a float tensor) without adding detail.
DEFAULT_MAX_PIXELS = 50_000_000
# A tiled image is decoded whole at native resolution (3 bytes a pixel, plus Pillow's copy
# while decoding): 500 megapixels is 1.5 GB decoded, 22,360 px a side.
DEFAULT_TILE_MAX_PIXELS = 500_000_000
FP16_ON_CPU = (
    "precision fp16 is for GPUs: on a CPU, fp16 autocast runs R50-FPN many times slower than "
    "bf16; use bf16 (or fp32) there"
)
# Low-cardinality columns it makes sense to make folders of. ``label`` partitions only the
# instances table; ``status`` only the images table.
PARTITION_COLUMNS = ("run_id", "label", "label_id", "status")

# The argument groups of `segpipe run --help`; settings of no group are listed under "options".
INPUT_GROUP = "input (one of)"
MODEL_GROUP = "model"
SCALE_GROUP = "scale"
ERRORS_GROUP = "error budget"
TILE_GROUP = "huge images (tiled inference)"
# The least tile side: the model's feature maps are strided up to 32 (64 with the pool).
MIN_TILE = 64
# What one output Parquet file holds at most, as the Arrow size of its rows (RunConfig).
MAX_FILE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Flag:
    """The command-line flag of a setting (a dataclass field); see :func:`flag`."""

    help: str
    name: str | None = None
    dest: str | None = None
    group: str | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    many: bool = False
    exclusive: str | None = None


def flag(
    help: str,
    *,
    name: str | None = None,
    dest: str | None = None,
    group: str | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    many: bool = False,
    exclusive: str | None = None,
) -> dict[str, Any]:
    """Field metadata declaring a setting's flag: ``field(default=4, metadata=flag("..."))``.

    ``help``: one line; the CLI appends "(default: X)" from the field's default unless the
    text has a "(default..." of its own (or the default is None, False or empty). ``name``: the
    flag, if not ``--field-name``. ``dest``: the argparse and config-file key, if not the
    field's name. ``group``: the argument group. ``parse``: what turns the flag's text into a
    value, if not the field's type. ``many``: the flag takes one or more values and may be
    repeated. ``exclusive``: flags naming the same ``exclusive`` exclude each other.
    """
    return {
        "flag": Flag(help, name, dest, group, choices, parse, metavar, many, exclusive),
    }


def set_by(name: str) -> dict[str, Any]:
    """Field metadata of a setting that has no flag of its own: flag ``name`` sets it."""
    return {"set_by": name}


def comma_separated(text: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``: the values of a comma-separated flag."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


# Checkpoints shipped inside the package (``segpipe/<path>``), by the name ``--weights``
# takes. Here rather than with the model code so that the driver can tell a name from a
# path without importing torch.
SHIPPED_WEIGHTS = {"shapes": "weights/shapes.pt"}


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

    arch: str = field(
        default="auto",
        metadata=flag(
            "auto: the checkpoint's, else R50-FPN", group=MODEL_GROUP, choices=ARCH_CHOICES
        ),
    )
    weights: str = field(
        default="DEFAULT",
        metadata=flag(
            "DEFAULT | <torchvision name> | <checkpoint URI> | shapes | none", group=MODEL_GROUP
        ),
    )
    weights_sha256: str | None = field(
        default=None,
        metadata=flag(
            "required SHA-256 (hex) of the checkpoint file; a mismatch refuses to load it",
            group=MODEL_GROUP,
        ),
    )
    # For a non-COCO checkpoint that carries none: a JSON list of names, a COCO "categories"
    # list of {"id", "name"} objects, or a text file with one name per line.
    categories: str | None = field(
        default=None,
        metadata=flag(
            "category names for the checkpoint (JSON list, COCO categories, or one a line)",
            group=MODEL_GROUP,
            metavar="URI",
        ),
    )
    device: str = field(
        default="auto",
        metadata=flag("where the model runs", group=MODEL_GROUP, choices=DEVICES),
    )
    min_size: int | None = field(
        default=None,
        metadata=flag(
            "short side to rescale each image to (default: checkpoint's, else 800)",
            group=MODEL_GROUP,
        ),
    )
    max_size: int | None = field(
        default=None,
        metadata=flag(
            "cap on the long side after rescaling (default: checkpoint's, else 1333)",
            group=MODEL_GROUP,
        ),
    )
    score_threshold: float = field(
        default=0.05,
        metadata=flag("drop detections scoring below this", group=MODEL_GROUP),  # box_score_thresh
    )
    mask_threshold: float = field(
        default=0.5,
        metadata=flag("a mask pixel is set where its probability is > this", group=MODEL_GROUP),
    )
    max_detections: int = field(
        default=100,
        metadata=flag("keep at most this many detections per image", group=MODEL_GROUP),
    )
    # Speed levers, measured in BENCHMARKS.md: run the model under bf16/fp16 autocast (box
    # and mask geometry stays float32), with channels-last convolutions, with cuDNN autotuning.
    precision: str = field(
        default="fp32",
        metadata=flag(
            "autocast precision; box and mask geometry stays float32",
            group=MODEL_GROUP,
            choices=PRECISIONS,
        ),
    )
    channels_last: bool = field(
        default=False, metadata=flag("channels-last convolutions", group=MODEL_GROUP)
    )
    cudnn_benchmark: bool = field(
        default=False, metadata=flag("cuDNN autotuning (CUDA)", group=MODEL_GROUP)
    )

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

    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=flag("refuse images of more pixels than this", group=MODEL_GROUP),
    )
    # By default an image larger than the model's input is decoded straight to the size the
    # model would resize it to (JPEG DCT scaling, then a resize), and the rows still describe
    # the full-resolution image. This decodes every pixel instead, as torchvision would.
    full_resolution: bool = field(
        default=False,
        metadata=flag(
            "decode large images in full and let the model resize them, as torchvision does "
            "(slower; bit-exact torchvision behaviour on large images)",
            group=MODEL_GROUP,
        ),
    )

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class TileConfig:
    """Tiled inference for huge images (aerial scenes, slides, shelf scans): an image of more
    than ``tile_above`` pixels is decoded at native resolution and cut into overlapping
    ``tile`` x ``tile`` tiles, each a model input of its own; the detections of its tiles are
    merged into the image's instances (:mod:`segpipe.core.tiles`). Off while ``tile`` is 0.
    """

    tile: int = field(
        default=0,
        metadata=flag(
            "cut images of more than --tile-above pixels into tiles of this side (native "
            "pixels; the model's min size keeps them at native scale); 0: never",
            group=TILE_GROUP,
            metavar="PIXELS",
        ),
    )
    tile_overlap: int = field(
        default=128,
        metadata=flag(
            "pixels neighbouring tiles share at least (objects up to this size are whole in "
            "one tile)",
            group=TILE_GROUP,
            metavar="PIXELS",
        ),
    )
    tile_above: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=flag(
            "tile the images of more pixels than this; smaller ones go through whole",
            group=TILE_GROUP,
            metavar="PIXELS",
        ),
    )
    tile_max_pixels: int = field(
        default=DEFAULT_TILE_MAX_PIXELS,
        metadata=flag(
            "refuse tiled images of more pixels than this (--max-pixels bounds the others)",
            group=TILE_GROUP,
            metavar="PIXELS",
        ),
    )
    tile_match_iou: float = field(
        default=0.5,
        metadata=flag(
            "two detections of one class from overlapping tiles are one object when their "
            "masks' IoU within the tiles' shared area is at least this",
            group=TILE_GROUP,
        ),
    )
    tile_max_detections: int = field(
        default=10_000,
        metadata=flag("keep at most this many instances per tiled image", group=TILE_GROUP),
    )

    @property
    def enabled(self) -> bool:
        return self.tile > 0

    def tiled(self, height: int, width: int) -> bool:
        """Whether an image of ``height`` x ``width`` is cut into tiles: over ``tile_above``
        pixels and larger than one tile (an image within one tile goes through whole)."""
        return (
            self.enabled
            and height * width > self.tile_above
            and (height > self.tile or width > self.tile)
        )

    def __post_init__(self) -> None:
        if self.tile < 0 or 0 < self.tile < MIN_TILE:
            raise ValueError(f"tile must be 0 (off) or at least {MIN_TILE} pixels, got {self.tile}")
        if self.tile and not 0 <= self.tile_overlap <= self.tile // 2:
            raise ValueError(
                f"tile_overlap must be in [0, tile / 2] = [0, {self.tile // 2}], got "
                f"{self.tile_overlap}"
            )
        for name in ("tile_above", "tile_max_pixels", "tile_max_detections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.tile_match_iou <= 1.0:
            raise ValueError(f"tile_match_iou must be in (0, 1], got {self.tile_match_iou}")


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

    # Required, but not by argparse: a config file may set it.
    output: str = field(metadata=flag("where the tables go (required)", metavar="URI"))
    inputs: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            "folders, prefixes or globs on any fsspec filesystem",
            name="--input",
            group=INPUT_GROUP,
            metavar="URI",
            many=True,
        ),
    )
    manifest: str | None = field(
        default=None,
        metadata=flag("Parquet, CSV or text file of image URIs", group=INPUT_GROUP, metavar="URI"),
    )
    # Text manifests have one URI per line.
    uri_column: str = field(
        default="uri",
        metadata=flag("Parquet or CSV manifest column holding the URIs", group=INPUT_GROUP),
    )
    extensions: tuple[str, ...] = field(
        default=DEFAULT_EXTENSIONS,
        metadata=flag(
            "image file extensions to list, comma-separated",
            group=INPUT_GROUP,
            parse=comma_separated,
        ),
    )
    run_id: str | None = field(
        default=None, metadata=flag("name of this run (default: run-<UTC timestamp>)")
    )
    model: ModelConfig = ModelConfig()
    decode: DecodeConfig = DecodeConfig()
    tiles: TileConfig = TileConfig()
    batch_size: int = field(default=4, metadata=flag("images per model call", group=SCALE_GROUP))
    load_batch_size: int = field(
        default=16, metadata=flag("images per read+decode task", group=SCALE_GROUP)
    )
    # `--actors N` or `--actors MIN:MAX` sets both min_actors and max_actors (in the CLI's
    # run_config, after a config file's `actors` is merged).
    min_actors: int = field(
        default=1,
        metadata=flag(
            "model actors: N or MIN:MAX (default: one per GPU, or 1 without GPUs)",
            name="--actors",
            dest="actors",
            group=SCALE_GROUP,
            parse=str,
        ),
    )
    # Default: one per GPU, or min_actors without GPUs.
    max_actors: int | None = field(default=None, metadata=set_by("--actors"))
    gpus_per_actor: float | None = field(
        default=None,
        metadata=flag(
            "GPUs per model actor (default: 1 when the cluster has GPUs, else 0)",
            group=SCALE_GROUP,
        ),
    )
    cpus_per_actor: float = field(
        default=1.0, metadata=flag("CPUs per model actor", group=SCALE_GROUP)
    )
    # What Ray sets by default. On a CPU-only node whose decoding is light, all of the node's
    # cores pay (Benchmarks).
    torch_threads: int | None = field(
        default=None,
        metadata=flag(
            "torch threads per model actor on CPU (default: --cpus-per-actor)",
            group=SCALE_GROUP,
        ),
    )
    partition_by: tuple[str, ...] = field(
        default=("run_id",),
        metadata=flag(
            f"partition columns ({', '.join(PARTITION_COLUMNS)}), comma-separated, or 'none'",
            group=SCALE_GROUP,
            parse=comma_separated,
        ),
    )
    # Instances files hold the detections of their images.
    images_per_file: int = field(
        default=5000, metadata=flag("images (rows) per images file", group=SCALE_GROUP)
    )
    # A unit whose rows take more is written as several files of that unit.
    max_file_bytes: int = field(
        default=MAX_FILE_BYTES,
        metadata=flag(
            "bytes of rows (Arrow size) per Parquet file; a larger unit is split between "
            "images (default: 512 MiB)",
            group=SCALE_GROUP,
        ),
    )
    # On a cluster of several nodes, local paths are refused unless they are shared.
    local_paths_shared: bool = field(
        default=False,
        metadata=flag(
            "the local paths given (inputs, manifest, output, weights, categories) are on a "
            "disk every node mounts at the same place (NFS, a FUSE mount); without it a "
            "cluster of several nodes refuses them"
        ),
    )
    # The run's lease (segpipe/job/lease.py): one driver per run at a time.
    lease_ttl: float = field(
        default=90.0,
        metadata=flag(
            "seconds a driver's lease on its run lasts unrenewed (it renews every TTL/4.5): "
            "then another driver may take the run over, and this one stops without "
            "committing more",
            metavar="SECONDS",
        ),
    )
    # The error budget (segpipe/job/budget.py): a run mostly of error rows fails.
    max_error_rate: float = field(
        default=0.5,
        metadata=flag(
            "a run whose share of error images ends above this fails (exit 1), and one above "
            "it once --error-check-after images are committed stops early; 1 turns it off",
            group=ERRORS_GROUP,
        ),
    )
    error_check_after: int = field(
        default=100,
        metadata=flag(
            "images this attempt must have committed before its error rate can stop it early",
            group=ERRORS_GROUP,
        ),
    )
    # An existing run of the same id: finish it (skip committed images) or replace it.
    resume: bool = field(
        default=False,
        metadata=flag(
            "finish an interrupted run of this --run-id (without one: the output's only "
            "unfinished run): skip the images it committed",
            exclusive="again",
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=flag(
            "replace the run of this --run-id (its rows, record and listing) with a new one",
            exclusive="again",
        ),
    )
    # Incremental runs over a growing input (segpipe/job/runs.py, done_in_earlier_runs).
    skip_done: bool = field(
        default=False,
        metadata=flag(
            "skip images that have an ok row in an earlier run in this output made with the "
            "same weights and the same settings that shape the rows"
        ),
    )

    def __post_init__(self) -> None:
        if bool(self.inputs) == (self.manifest is not None):
            raise ValueError("give either input URIs or a manifest, not both and not neither")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.overwrite and self.run_id is None:
            raise ValueError("--overwrite needs the --run-id of the run to replace")
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
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if not self.lease_ttl >= 2.0:
            raise ValueError(f"lease_ttl must be at least 2 seconds, got {self.lease_ttl}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.error_check_after < 1:
            raise ValueError(f"error_check_after must be >= 1, got {self.error_check_after}")
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

    device: str = field(default="auto", metadata=flag("auto, cpu or cuda"))
    arch: str = field(default="maskrcnn_resnet50_fpn", metadata=flag("the model's architecture"))
    weights: str = field(
        default="none",
        metadata=flag("as segpipe run's; none (random) gives exactly --detections per image"),
    )
    width: int = field(default=640, metadata=flag("width of the generated JPEGs"))
    height: int = field(default=480, metadata=flag("height of the generated JPEGs"))
    batch_size: int = field(default=1, metadata=flag("images per model call"))
    detections: int = field(
        default=20, metadata=flag("detections per image (the model's max, the stages' masks)")
    )
    images: int = field(default=8, metadata=flag("images for the bare model and the pipeline"))
    scale: int = field(default=10, metadata=flag("the scaling run uses images * scale; 1 skips it"))
    bare_seconds: float = field(
        default=20.0, metadata=flag("time the bare model over at least this long (and 3 rounds)")
    )
    cpus_per_actor: float = field(default=1.0, metadata=flag("CPUs per pipeline model actor"))
    gpus_per_actor: float = field(
        default=0.0,
        metadata=flag(
            "GPUs per pipeline model actor; 0: the pipeline's default (1 when there are GPUs); "
            "0.5: two a GPU"
        ),
    )
    torch_threads: int = field(
        default=0,
        metadata=flag("torch threads of the pipeline's model actor; 0: as the bare model's"),
    )
    # The model's levers, in both the bare model and the pipeline.
    precision: str = field(default="fp32", metadata=flag("autocast: fp32, bf16 or fp16"))
    channels_last: bool = field(default=False, metadata=flag("channels-last convolutions"))
    # Everywhere the bench decodes (non-model stages, the bare model's input, the pipeline):
    # by default at the model's scale, as `segpipe run` does; this is `run --full-resolution`.
    full_resolution: bool = field(
        default=False,
        metadata=flag(
            "decode the JPEGs in full and let the model resize them, as segpipe run "
            "--full-resolution does (default: decode at the model's scale)"
        ),
    )

    def __post_init__(self) -> None:
        for name in ("width", "height", "batch_size", "detections", "images", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
