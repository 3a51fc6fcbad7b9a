"""The pipeline's steps as plain functions and callable classes over batches.

A batch is ``dict[str, numpy.ndarray]`` (Ray Data's "numpy" batch format), one entry per
image. None of this imports ray: the pipeline module wraps these steps in ``map_batches``, and
tests and the in-process runner call them directly.

Columns between steps:

- input (:func:`segpipe.job.inputs.prepare_manifest_batch`, :func:`with_image_ids`,
  :func:`distinct_images`): ``uri`` (str), ``image_id``, ``inputs.COPIES_COLUMN`` (how many
  input rows named the image) and, for a manifest with extra columns,
  ``inputs.EXTRAS_COLUMN`` (their values, packed: binary). Columns other than load_batch's
  are carried through untouched.
- after :func:`load_batch`: ``image_id``, ``width``, ``height`` (int32: the upright image's
  full-resolution size; -1 when unknown), ``status``, ``error_code``, ``error`` (str, "" when
  ok) and ``pixels`` (uint8 (h, w, 3): the full image, or, decoded at the model's scale,
  smaller than ``height`` x ``width``; an empty (0, 0, 3) array for images that failed).
  Every coordinate downstream is in the full-resolution ``width`` x ``height``.
- after :class:`Segment`: a ``pyarrow.Table`` with one row per image: the ``images`` columns,
  the extra columns (unpacked, with the manifest's types), and ``instances``, a list of
  structs (:data:`WINDOWED_STRUCT`) holding the image's detections, each mask as its packed
  window (``core.encode.MASK_WINDOW_FIELDS``).
- after :func:`encode_rows` (CPU tasks, so the model actors never wait for it): the same,
  with ``instances`` as :data:`INSTANCE_STRUCT`, masks as COCO RLE.
  :func:`split_tables` turns it into the two output tables.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segpipe.config import DecodeConfig, ModelConfig, TileConfig
from segpipe.core.decode import DecodedImage, decode_image
from segpipe.core.detections import Detections
from segpipe.core.encode import encode_windows
from segpipe.core.rows import (
    WINDOWED_SCHEMA,
    ImageRecord,
    ImageRef,
    images_table,
    windowed_instances_table,
)
from segpipe.core.tiles import segment_tiled, tiles_of
from segpipe.io import read_bytes, redact
from segpipe.job.inputs import COPIES_COLUMN, EXTRAS_COLUMN, canonical_uri, unpack_extras
from segpipe.job.timeline import ActorMarks
from segpipe.layout import INSTANCES_DIR
from segpipe.schema import (
    BAD_URI,
    IMAGES_SCHEMA,
    INSTANCES_SCHEMA,
    MODEL_ERROR,
    NOT_FOUND,
    PERMISSION_DENIED,
    READ_ERROR,
    STATUS_ERROR,
    STATUS_OK,
    Failure,
    image_id,
)

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Columns an instance row takes from its image rather than from the detection.
_IMAGE_LEVEL = {"run_id", "image_id", "uri", "image_width", "image_height"}
INSTANCE_STRUCT = pa.struct([f for f in INSTANCES_SCHEMA if f.name not in _IMAGE_LEVEL])
WINDOWED_STRUCT = pa.struct([f for f in WINDOWED_SCHEMA if f.name not in _IMAGE_LEVEL])
# A column of encoded image bytes that load_batch decodes instead of reading the URI
# (segpipe.segment over a Dataset that already holds the files: read_binary_files).
BYTES_COLUMN = "bytes"
# Columns load_batch adds (or uses up); anything else in a batch is carried through to the
# images table.
_LOAD_COLUMNS = (
    "image_id", "width", "height", "status", "error_code", "error", "pixels", BYTES_COLUMN
)  # fmt: skip


def fetch(uri: str) -> bytes | Failure:
    """The bytes at ``uri``, or a read error record (missing object, access denied, ...)."""
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        return Failure(NOT_FOUND, f"object not found: {redact(uri)}")
    except PermissionError as exc:
        return Failure(PERMISSION_DENIED, f"access denied reading {redact(uri)}: {exc}")
    except Exception as exc:
        return Failure(READ_ERROR, f"could not read {redact(uri)}: {type(exc).__name__}: {exc}")


def load_batch(
    batch: Batch,
    decode: DecodeConfig,
    fit: tuple[int, int] | None = None,
    io_threads: int = 16,
    tiling: TileConfig | None = None,
) -> Batch:
    """Read and decode every image of a batch; failures become error rows, never exceptions.

    ``fit``: the model transform's ``(min_size, max_size)``; unless ``decode.full_resolution``,
    large images are decoded straight to the model's input size (``width`` and ``height``
    stay the full-resolution upright size: ``pixels`` may be smaller). Images are decoded one
    at a time, so at most one full-resolution decode is alive at once.

    ``tiling``: the images it tiles are decoded in full, at native resolution, and bounded
    by ``tiling.tile_max_pixels`` instead of ``decode.max_pixels``.

    A batch with a :data:`BYTES_COLUMN` is decoded from those bytes, the URIs only naming
    the images (nothing is read; a name that is not a valid URI is kept as given); a null
    there is a ``read_error`` row.
    """
    uris: list[str] = []
    bad: dict[int, Failure] = {}
    given = batch.get(BYTES_COLUMN)
    for i, raw in enumerate(batch["uri"]):
        uri, problem = _canonical(raw)
        uris.append(uri)
        if problem is not None and given is None:  # given bytes: the name is only a name
            bad[i] = Failure(BAD_URI, problem)

    def get(i: int) -> bytes | Failure:
        if i in bad:
            return bad[i]
        if given is None:
            return fetch(uris[i])
        data = given[i]
        if data is None:
            return Failure(READ_ERROR, f"no bytes were given for {redact(uris[i])}")
        return bytes(data)

    with ThreadPoolExecutor(max_workers=max(1, min(io_threads, len(uris)))) as pool:
        fetched = list(pool.map(get, range(len(uris))))
    out: Batch = {k: v for k, v in batch.items() if k not in _LOAD_COLUMNS}
    out["uri"] = np.array(uris, dtype=object)
    out["image_id"] = np.array([image_id(u) for u in uris], dtype=object)
    out.update(_decode_all(fetched, decode, None if decode.full_resolution else fit, tiling))
    # Rows ordered by aspect ratio, error rows last: the model's batches are runs of
    # consecutive rows, and images of one shape pad less when batched. (Row order carries no
    # meaning in the output.)
    ok = out["status"] == STATUS_OK
    ratio = np.where(ok, out["width"] / np.maximum(out["height"], 1), np.inf)
    order = np.argsort(ratio, kind="stable")
    return {k: v[order] for k, v in out.items()}


def _decode_all(
    fetched: list[bytes | Failure],
    decode: DecodeConfig,
    fit: tuple[int, int] | None,
    tiling: TileConfig | None = None,
) -> Batch:
    """The columns ``load_batch`` adds, from each row's bytes or failure: ``width``,
    ``height`` (-1 where unknown), ``status``, ``error_code``, ``error`` and ``pixels``
    (an empty image for a failure). Each row's bytes are let go of once decoded."""
    n = len(fetched)
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    status = np.empty(n, dtype=object)
    error_code = np.full(n, "", dtype=object)
    error = np.full(n, "", dtype=object)
    pixels = np.empty(n, dtype=object)
    for i, got in enumerate(fetched):
        fetched[i] = b""  # the encoded bytes are not needed once decoded
        if isinstance(got, Failure):
            result: DecodedImage | Failure = got
        else:
            result = decode_image(got, max_pixels=decode.max_pixels, fit=fit, tiling=tiling)
        if isinstance(result, DecodedImage):
            status[i] = STATUS_OK
            width[i], height[i] = result.width, result.height
            pixels[i] = result.pixels
        else:
            status[i], error_code[i], error[i] = STATUS_ERROR, result.code, result.message
            width[i] = -1 if result.width is None else result.width
            height[i] = -1 if result.height is None else result.height
            pixels[i] = np.zeros((0, 0, 3), dtype=np.uint8)
    return {
        "width": width,
        "height": height,
        "status": status,
        "error_code": error_code,
        "error": error,
        "pixels": pixels,
    }


# What a load_batch task's fetched file takes before it is decoded (a 12-24 MP JPEG: 3-8 MB).
ENCODED_BYTES_PER_IMAGE = 4 * 1024**2


# Images a read+decode task, or a model actor's call, takes in a tiled run (at most; the
# setting if smaller): any of them may be a scene decoded in full at up to tile_max_pixels.
TILED_LOAD_BATCH = 1
# Copies a decode task holds of an image it decoded in full, beside Pillow's while decoding:
# the array, Ray's copy of it into the output block, and that block's write to the object
# store (a 400-megapixel scene, 1.2 GB decoded, took its task to 5.8 GiB while Pillow's
# exif_transpose still added a copy).
_HELD_COPIES = 3


def load_rows(rows: int, tiling: TileConfig) -> int:
    """Images a step takes at once, given its setting ``rows`` (``--load-batch-size`` for a
    :func:`load_batch` task, ``--batch-size`` for a model actor's call): at most
    :data:`TILED_LOAD_BATCH` in a tiled run, where any of them may be a huge scene (so
    that scenes spread over the actors, and a task's memory stays that of one)."""
    return min(rows, TILED_LOAD_BATCH) if tiling.enabled else rows


def load_batch_memory(
    images: int,
    decode: DecodeConfig,
    fit: tuple[int, int] | None,
    tiling: TileConfig | None = None,
) -> int:
    """Bytes a :func:`load_batch` task of ``images`` images holds at most: their pixels at
    the model's largest input (``3 x min_size x max_size``) plus one full-resolution decode
    in progress (``max_pixels`` RGB, and Pillow's copy), or, decoding at full resolution,
    every image at ``max_pixels``; and the fetched files. In a tiled run every image may
    be a scene decoded in full, held :data:`_HELD_COPIES` times at up to
    ``tile_max_pixels`` RGB, and Pillow's copy of the one being decoded."""
    if tiling is not None and tiling.enabled:
        full = 3 * max(tiling.tile_max_pixels, decode.max_pixels)
        return (_HELD_COPIES * images + 1) * full + images * ENCODED_BYTES_PER_IMAGE
    full = 3 * decode.max_pixels
    if fit is None or decode.full_resolution:
        pixels = images * full
    else:
        pixels = images * 3 * fit[0] * fit[1] + 2 * full
    return pixels + images * ENCODED_BYTES_PER_IMAGE


def with_image_ids(rows: pa.Table) -> pa.Table:
    """The rows with ``image_id`` added, computed as :func:`load_batch` will (from the
    canonical URI, or from the text as given when it is not a valid one)."""
    ids = [image_id(_canonical(raw)[0]) for raw in rows.column("uri").to_pylist()]
    return rows.append_column("image_id", pa.array(ids, type=pa.string()))


def distinct_images(rows: pa.Table) -> pa.Table:
    """One row per ``image_id``, with :data:`COPIES_COLUMN` saying how many rows named it.

    ``rows`` must hold every input row of each image it has (the pipeline hash-partitions
    the input on ``image_id`` first). Of several rows of one image, the one kept is the
    first in the order of the URI as written (stripped), then of the packed extra manifest
    values as bytes (an arbitrary order, but a fixed one): the same row whatever order the
    input was read in, on every run and resume.
    """
    keys = [("image_id", "ascending"), ("uri", "ascending")]
    if EXTRAS_COLUMN in rows.column_names:
        keys.append((EXTRAS_COLUMN, "ascending"))
    n = rows.num_rows
    order = pc.sort_indices(rows, sort_keys=keys)
    ids = rows.column("image_id").take(order)
    changes = pc.not_equal(ids.slice(1), ids.slice(0, max(n - 1, 0)))
    firsts = np.flatnonzero(np.concatenate(([n > 0], changes.to_numpy(zero_copy_only=False))))
    copies = np.diff(np.append(firsts, n)).astype(np.int32)
    kept = rows.take(order.take(pa.array(firsts, type=pa.int64())))
    return kept.append_column(COPIES_COLUMN, pa.array(copies, type=pa.int32()))


def take_copies(rows: pa.Table) -> tuple[pa.Table, int]:
    """``rows`` without :data:`COPIES_COLUMN`, and the duplicates it counts: the input rows
    beyond the first of each image (0 when the rows have no such column)."""
    if COPIES_COLUMN not in rows.column_names:
        return rows, 0
    copies = pc.fill_null(rows.column(COPIES_COLUMN), 1)
    duplicates = int(pc.sum(copies).as_py() or 0) - rows.num_rows
    return rows.drop_columns([COPIES_COLUMN]), duplicates


def ok_image_ids(images: pa.Table) -> pa.Table:
    """The ``image_id`` column of ``images`` rows (with at least ``image_id`` and
    ``status``), of the ``ok`` rows only: the images an earlier run segmented
    (``--skip-done``)."""
    return images.filter(pc.equal(images.column("status"), STATUS_OK)).select(["image_id"])


def _canonical(raw: object) -> tuple[str, str | None]:
    """The canonical URI, or the text as given and why it is not a valid one."""
    try:
        return canonical_uri(str(raw)), None
    except ValueError as exc:
        return str(raw), str(exc)


class Segment:
    """Mask R-CNN over a decoded batch -> one row per image with its detections nested.

    Holds the model: construct once per worker, call once per batch. ``extras``: the types of
    the manifest's extra columns, which batches carry packed (:data:`EXTRAS_COLUMN`).
    """

    def __init__(
        self,
        model: ModelConfig,
        run_id: str,
        torch_threads: int | None = None,
        extras: pa.Schema | None = None,
        timeline_to: tuple[str, str] | None = None,
        tiling: TileConfig | None = None,
        batch_size: int = 1,
    ) -> None:
        # ``timeline_to``: (output, run id) to write this actor's start-up marks under.
        # ``tiling``: cut the images it tiles into tiles, run in batches of ``batch_size``
        # model inputs with the batch's other images (core/tiles.py).
        self.marks = ActorMarks(*timeline_to) if timeline_to is not None else None
        # Imported here so that the CPU steps never pay for importing torch.
        import torch

        if self.marks is not None:
            self.marks.mark("torch_imported")
        from segpipe.core.model import Segmenter

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.run_id = run_id
        self.extras = extras
        self.tiling = tiling if tiling is not None and tiling.enabled else None
        self.batch_size = batch_size
        self.segmenter = Segmenter(model)
        if self.marks is not None:
            self.marks.mark("model_loaded")

    def __call__(self, batch: Batch) -> pa.Table:
        if self.marks is not None:
            self.marks.mark("first_batch_in")
        rows = self._segment(batch)
        if self.marks is not None and not self.marks.written:
            self.marks.mark("first_batch_out")
            self.marks.write()
        return rows

    def _model(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Detections]:
        if self.tiling is None:
            return self.segmenter(images, sizes)
        return segment_tiled(self.segmenter, images, sizes, self.tiling, self.batch_size)

    def _tiles(self, batch: Batch) -> np.ndarray:
        """How many tiles each row's image is cut into (0: whole, or not decoded)."""
        counts = np.zeros(len(batch["uri"]), dtype=np.int32)
        if self.tiling is not None:
            for i, pixels in enumerate(batch["pixels"]):
                counts[i] = len(tiles_of(_size(batch, i), pixels.shape, self.tiling))
        return counts

    def _segment(self, batch: Batch) -> pa.Table:
        ok = [i for i, s in enumerate(batch["status"]) if s == STATUS_OK]
        tiles = self._tiles(batch)
        try:
            detections = self._model(
                [batch["pixels"][i] for i in ok], [_size(batch, i) for i in ok]
            )
            by_row: dict[int, Detections] = dict(zip(ok, detections, strict=True))
        except Exception as exc:
            _exit_if_device_broken(exc)
            log.warning(
                "the model failed on a batch of %d images (%s: %s); running them one by one",
                len(ok),
                type(exc).__name__,
                str(exc)[:200],
            )
            by_row, batch = self._one_by_one(batch, ok)
        return image_rows(batch, self.run_id, by_row, self.segmenter.categories, self.extras, tiles)

    def _one_by_one(self, batch: Batch, ok: list[int]) -> tuple[dict[int, Detections], Batch]:
        """Each image alone; one the model still fails on becomes an error row."""
        by_row: dict[int, Detections] = {}
        status, code, error = (batch[k].copy() for k in ("status", "error_code", "error"))
        for i in ok:
            try:
                by_row[i] = self._model([batch["pixels"][i]], [_size(batch, i)])[0]
            except Exception as exc:
                _exit_if_device_broken(exc)
                status[i], code[i] = STATUS_ERROR, MODEL_ERROR
                what = "one of this image's tiles" if self._tiles(batch)[i] else "this image"
                error[i] = f"the model failed on {what}: {type(exc).__name__}: {exc}"[:1000]
        return by_row, {**batch, "status": status, "error_code": code, "error": error}


# The exit status of a model actor that ends itself because its device is broken.
DEVICE_BROKEN_EXIT = 75


def device_broken(exc: BaseException) -> bool:
    """Whether ``exc`` says the actor's device is unusable from now on, not that one image
    was bad: a CUDA (accelerator) error such as an illegal memory access or a device-side
    assert. CUDA errors are sticky: every later call in the process fails the same way.
    Out-of-memory is not among them (it is about the batch; the actor retries one by one)."""
    import torch  # the model actor has it imported already

    return isinstance(exc, torch.AcceleratorError) or "CUDA error:" in str(exc)


def _exit_if_device_broken(exc: BaseException) -> None:
    """End the model actor's process if its device is broken, rather than turn every later
    image into a ``model_error`` row: Ray then starts a new actor (a new CUDA context) and
    gives the batch to it, as it does for an actor that was killed."""
    if device_broken(exc):
        log.critical(
            "the model actor's device is broken (%s: %s); ending this actor so that Ray "
            "replaces it",
            type(exc).__name__,
            str(exc)[:300],
        )
        logging.shutdown()
        os._exit(DEVICE_BROKEN_EXIT)


def image_rows(
    batch: Batch,
    run_id: str,
    detections: dict[int, Detections],
    categories: Sequence[str],
    extras: pa.Schema | None = None,
    tiles: np.ndarray | None = None,
) -> pa.Table:
    """The per-image table for a loaded batch, given detections for its decoded rows; the
    nested instances hold mask windows (:data:`WINDOWED_STRUCT`), for :func:`encode_rows`.
    ``tiles``: how many tiles each row's image was cut into (default: none, all whole).

    Packed manifest columns (:data:`EXTRAS_COLUMN`) are unpacked with the types ``extras``
    declares, so every batch gives them the manifest's types, nulls as nulls. Any other
    carried column is converted from its numpy array as it is."""
    records: list[ImageRecord] = []
    refs: list[ImageRef] = []
    counts = np.zeros(len(batch["uri"]), dtype=np.int32)
    cut = tiles if tiles is not None else np.zeros(len(counts), dtype=np.int32)
    for i, (uri, iid) in enumerate(zip(batch["uri"], batch["image_id"], strict=True)):
        width, height = int(batch["width"][i]), int(batch["height"][i])
        if i in detections:
            refs.append(ImageRef(run_id, str(iid), str(uri), width, height))
            counts[i] = len(detections[i])
            records.append(ImageRecord.ok(refs[-1], int(counts[i]), int(cut[i])))
        else:
            size = (width, height) if width >= 0 else (None, None)
            err = Failure(str(batch["error_code"][i]), str(batch["error"][i]), *size)
            records.append(ImageRecord.failed(run_id, str(iid), str(uri), err, int(cut[i])))
    flat = windowed_instances_table(refs, [detections[i] for i in sorted(detections)], categories)
    struct = pa.StructArray.from_arrays(
        [flat.column(name).combine_chunks() for name in WINDOWED_STRUCT.names],
        fields=list(WINDOWED_STRUCT),
    )
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    table = images_table(records)
    for name in _extra_columns(batch):
        if name != EXTRAS_COLUMN:
            table = table.append_column(name, pa.array(list(batch[name])))
        elif extras is None:
            raise ValueError(f"a batch with {EXTRAS_COLUMN} needs the extra columns' schema")
        else:
            for field, column in zip(extras, unpack_extras(batch[name], extras), strict=True):
                table = table.append_column(field, column)
    return table.append_column("instances", pa.ListArray.from_arrays(offsets, struct))


def encode_rows(rows: pa.Table) -> pa.Table:
    """Per-image rows from :func:`image_rows` with each mask window run-length encoded
    (:data:`INSTANCE_STRUCT`); rows already encoded are returned as they are."""
    index = rows.schema.get_field_index("instances")
    if "mask_rle" in rows.schema.field(index).type.value_type.names:
        return rows
    nested = rows.column(index).combine_chunks()
    windows = nested.flatten()
    parents = pc.list_parent_indices(nested)
    heights = rows.column("height").take(parents).to_numpy(zero_copy_only=False)
    widths = rows.column("width").take(parents).to_numpy(zero_copy_only=False)
    rle, area = encode_windows(windows, heights, widths)
    encoded = {"mask_rle": rle, "mask_area": area}
    struct = pa.StructArray.from_arrays(
        [encoded[n] if n in encoded else windows.field(n) for n in INSTANCE_STRUCT.names],
        fields=list(INSTANCE_STRUCT),
    )
    offsets = pc.subtract(nested.offsets, nested.offsets[0])  # flatten() starts at offset 0
    return rows.set_column(index, "instances", pa.ListArray.from_arrays(offsets, struct))


def split_tables(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Per-image rows with nested detections -> (images table, instances table)."""
    rows = encode_rows(rows)
    images = rows.drop_columns(["instances"])
    nested = rows.column("instances").combine_chunks()
    flat = pc.list_flatten(nested)
    parents = pc.list_parent_indices(nested)
    columns = []
    for field in INSTANCES_SCHEMA:
        if field.name in INSTANCE_STRUCT.names:
            columns.append(flat.field(field.name))
        else:
            source = {"image_width": "width", "image_height": "height"}.get(field.name, field.name)
            columns.append(images.column(source).take(parents).cast(field.type))
    return images, pa.Table.from_arrays(columns, schema=INSTANCES_SCHEMA)


def one_table(rows: pa.Table, table: str) -> pa.Table:
    """One of the two tables (``images`` or ``instances``) of encoded per-image rows."""
    images, instances = split_tables(rows)
    return instances if table == INSTANCES_DIR else images.select(IMAGES_SCHEMA.names)


def segment_input(batch: pa.Table, uri_column: str, bytes_column: str | None) -> pa.Table:
    """A user's Dataset batch as :func:`load_batch` takes it: ``uri`` (the URI column as
    text), ``image_id``, and :data:`BYTES_COLUMN` when the images' bytes are given."""
    uris = batch.column(uri_column).cast(pa.string()).fill_null("")
    out = with_image_ids(pa.table({"uri": uris}))
    if bytes_column is not None:
        out = out.append_column(BYTES_COLUMN, batch.column(bytes_column).cast(pa.binary()))
    return out


def _size(batch: Batch, i: int) -> tuple[int, int]:
    """Row ``i``'s full-resolution ``(height, width)``, the frame of its detections."""
    return int(batch["height"][i]), int(batch["width"][i])


def _extra_columns(batch: Batch) -> list[str]:
    return [k for k in batch if k != "uri" and k not in _LOAD_COLUMNS]
