"""The two output tables, declared once.

Every writer, reader and test imports these schemas; nothing else spells out a column.

Conventions (the column contract; README.md "Output tables" says the same for SQL users):

- Pixel coordinates refer to the *decoded* image at full resolution: EXIF orientation
  applied, so width and height are those of the image as a viewer displays it, also when its
  pixels were decoded at the model's smaller scale (boxes and masks are mapped back). The
  origin is the top-left corner, x grows to the right, y grows downwards, units are pixels.
- Boxes are ``[box_x0, box_y0, box_x1, box_y1]`` (float32, absolute pixels; x1/y1 exclusive
  edges as torchvision reports them, so ``box_x1 - box_x0`` is the box width).
- ``mask_rle`` is the ``counts`` string of a COCO *compressed* RLE of the binary mask, in
  column-major (Fortran) order, of size ``[image_height, image_width]``. Decode it with
  ``pycocotools.mask.decode({"size": [h, w], "counts": mask_rle.encode()})`` -> uint8 (h, w).
- ``mask_area`` is the number of mask pixels (int64); ``score`` is the detector's confidence in
  0..1; ``instance_id`` is the 0-based rank of the instance within its image by descending
  score, so ``(run_id, image_id, instance_id)`` is the key of ``instances``.
- ``image_id`` is derived from the image URI alone (see :func:`image_id`), so it is the same in
  every run and joins runs of different models over the same images.

Columns whose bytes grow with the masks (``mask_rle`` here, the packed windows of
``core.encode.MASK_WINDOW_FIELDS``) are Arrow *large* types in memory, so that a unit of
thousands of images never overflows Arrow's 32-bit offsets; the others are bounded per row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

# ``images.status``: every input image has one row, decoded and segmented or not.
STATUS_OK = "ok"
STATUS_ERROR = "error"

# ``images.error_code`` of an error row: why that image has no detections.
BAD_URI = "bad_uri"  # the manifest entry is not a usable URI (a relative path, ...)
NOT_FOUND = "not_found"  # the object is gone (deleted after listing, a typo in a manifest)
PERMISSION_DENIED = "permission_denied"  # the storage refused to serve it
READ_ERROR = "read_error"  # reading failed for another reason, after the retries
EMPTY = "empty"  # a file of 0 bytes
NOT_AN_IMAGE = "not_an_image"  # text, HTML, SVG or an unknown format
TOO_LARGE = "too_large"  # over max_pixels, refused from its header before decoding
TRUNCATED = "truncated"  # the file ends early
CORRUPT = "corrupt"  # a broken header or broken compressed data
MODEL_ERROR = "model_error"  # the model failed on this image alone
ERROR_CODES = (
    BAD_URI,
    NOT_FOUND,
    PERMISSION_DENIED,
    READ_ERROR,
    EMPTY,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TRUNCATED,
    CORRUPT,
    MODEL_ERROR,
)


# The tables' schema version, "major.minor", in every Parquet file's key-value metadata
# (SCHEMA_VERSION_KEY) and in every run record. A new major renames, retypes or drops
# columns: readers refuse a major they do not know. A new minor only adds columns.
SCHEMA_VERSION = "1.1"
SCHEMA_VERSION_KEY = "segpipe.schema_version"


class SchemaVersionError(ValueError):
    """Tables written with a schema major version this segpipe does not know."""


def check_schema_version(version: str | None, what: str) -> None:
    """Refuse ``what`` (a run, a file) if its schema ``version`` has another major than
    :data:`SCHEMA_VERSION`'s; None (written before versions were recorded) is 1.0."""
    major = (version or "1.0").split(".", 1)[0]
    if major != SCHEMA_VERSION.split(".", 1)[0]:
        raise SchemaVersionError(
            f"{what} has tables of schema version {version}, and this segpipe "
            f"{_installed()} reads version {SCHEMA_VERSION.split('.')[0]}.x only: read it "
            "with the segpipe that wrote it (its run record names the version), or upgrade"
        )


def _installed() -> str:
    from importlib import metadata

    try:
        return metadata.version("segpipe")
    except metadata.PackageNotFoundError:
        return "(not installed)"


@dataclass(frozen=True)
class Failure:
    """Why an image has no detections: its error row's ``error_code`` (one of
    :data:`ERROR_CODES`) and ``error`` message, and its size when the header gave one."""

    code: str
    message: str
    width: int | None = None
    height: int | None = None


INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("instance_id", pa.int32(), nullable=False),
        pa.field("label_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("box_x0", pa.float32(), nullable=False),
        pa.field("box_y0", pa.float32(), nullable=False),
        pa.field("box_x1", pa.float32(), nullable=False),
        pa.field("box_y1", pa.float32(), nullable=False),
        # Large (64-bit offsets): a write unit's masks can pass the 2 GiB a string column
        # with 32-bit offsets holds. Parquet stores it as any string; SQL engines read VARCHAR.
        pa.field("mask_rle", pa.large_string(), nullable=False),
        pa.field("mask_area", pa.int64(), nullable=False),
        pa.field("image_width", pa.int32(), nullable=False),
        pa.field("image_height", pa.int32(), nullable=False),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        # Null when the image could not be decoded.
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # STATUS_OK | STATUS_ERROR
        # One of ERROR_CODES; null if ok.
        pa.field("error_code", pa.string()),
        # Human-readable message naming the cause; null if ok.
        pa.field("error", pa.string()),
        pa.field("num_instances", pa.int32(), nullable=False),
        # How many tiles the image was cut into for the model (--tile); 0: it went whole.
        # Added in schema version 1.1: files of 1.0 lack it (readers see NULL).
        pa.field("tiles", pa.int32(), nullable=False),
    ]
)


def image_id(uri: str) -> str:
    """Stable id of an image: the first 128 bits of SHA-256 of its URI, as 32 hex characters.

    The URI is hashed exactly as given; callers pass canonical URIs (``s3://bucket/key``,
    ``file:///abs/path``) so that the same object gets the same id in every run.
    """
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]
