"""Model outputs -> table rows: one ``instances`` row per detection, one ``images`` row per image.

A detection's mask travels as a *window*: the thresholded mask inside the rectangle the model
pasted it into (its box, slightly enlarged, clipped to the image), with that rectangle's
top-left corner. Nothing image-sized is made per detection: the model never pastes into a
full-resolution canvas, and the encoder works on the window alone.

Masks are stored as COCO compressed RLE (pycocotools), whose run lengths are counted in
column-major (Fortran) order over the whole image. :func:`encode_window` computes those runs
from the window directly: in column-major order a window's pixels lie in ``w`` stretches, one
per column, separated by the image rows above and below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segpipe.core.decode import DecodeError
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, STATUS_ERROR, STATUS_OK


@dataclass(frozen=True)
class Detections:
    """Detections of one image of ``image_size`` = ``(height, width)`` pixels.

    boxes: float32 (N, 4), ``x0, y0, x1, y1`` in absolute pixels of the input image.
    labels: int64 (N,), indices into the model's category names (0 is the background).
    scores: float32 (N,) in 0..1.
    masks: N bool arrays ``(h_k, w_k)``, the mask probabilities thresholded
    (> mask_threshold) inside window k; pixels outside the window are not in the mask.
    mask_origins: int32 (N, 2), window k's top-left pixel ``(x, y)``; the window lies inside
    the image: ``0 <= x``, ``x + w_k <= width``, likewise for y.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: Sequence[np.ndarray]
    mask_origins: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __post_init__(self) -> None:
        n, (height, width) = len(self), self.image_size
        if len(self.masks) != n or self.mask_origins.shape != (n, 2):
            raise ValueError(
                f"{n} detections need {n} mask windows and ({n}, 2) origins, got "
                f"{len(self.masks)} and {self.mask_origins.shape}"
            )
        for (x, y), window in zip(self.mask_origins.tolist(), self.masks, strict=True):
            h, w = window.shape
            if x < 0 or y < 0 or x + w > width or y + h > height:
                raise ValueError(
                    f"mask window {w}x{h} at ({x}, {y}) is not inside the {width}x{height} image"
                )

    @classmethod
    def from_full_masks(
        cls, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray
    ) -> Detections:
        """Detections from image-sized masks ``(N, H, W)``: each is cropped to the rectangle
        around its pixels (an empty mask to a 0x0 window)."""
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
        windows, origins = [], np.zeros((masks.shape[0], 2), dtype=np.int32)
        for k, mask in enumerate(masks.astype(bool, copy=False)):
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                windows.append(np.zeros((0, 0), dtype=bool))
                continue
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            windows.append(np.ascontiguousarray(mask[y0:y1, x0:x1]))
            origins[k] = (x0, y0)
        size = (int(masks.shape[1]), int(masks.shape[2]))
        return cls(boxes, labels, scores, windows, origins, size)

    def full_masks(self) -> np.ndarray:
        """The masks as image-sized bool ``(N, H, W)`` (for tests and small images only)."""
        out = np.zeros((len(self), *self.image_size), dtype=bool)
        for k, ((x, y), window) in enumerate(
            zip(self.mask_origins.tolist(), self.masks, strict=True)
        ):
            h, w = window.shape
            out[k, y : y + h, x : x + w] = window
        return out


@dataclass(frozen=True)
class ImageRef:
    """Identity of an image in the output: which run, which id and URI, its decoded size."""

    run_id: str
    image_id: str
    uri: str
    width: int
    height: int


def encode_window(window: np.ndarray, x: int, y: int, height: int, width: int) -> tuple[str, int]:
    """The COCO compressed RLE counts string and the area of a mask given as its ``window``
    (bool ``(h, w)``) at ``(x, y)`` in a ``height`` x ``width`` image. Decodes with
    ``{"size": [height, width], "counts": s.encode()}``; costs O(h * w), not O(H * W)."""
    h, w = window.shape
    area = int(np.count_nonzero(window))
    if area == 0:
        runs = np.array([height * width], dtype=np.int64)
    else:
        # Each window column with a zero above and below it, in column-major order: every
        # change of value is then inside one column, at padded row q of window column c,
        # which is image pixel (x + c, y + q - 1), index (x + c) * height + y + q - 1.
        padded = np.zeros((w, h + 2), dtype=np.uint8)
        padded[:, 1 : h + 1] = window.T
        flat = padded.reshape(-1)
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        column, row = np.divmod(changes, h + 2)
        starts = (x + column) * height + y + row - 1
        # A window as tall as the image: a column ending in a set pixel and the next one
        # starting with one give the same index twice, a run of 0 zeros; join the two runs.
        twice = np.flatnonzero(starts[1:] == starts[:-1])
        if twice.size:
            starts = np.delete(starts, np.concatenate((twice, twice + 1)))
        runs = np.diff(np.concatenate(([0], starts, [height * width])))
        if runs[-1] == 0:  # the mask ends at the image's last pixel
            runs = runs[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    return rle["counts"].decode("ascii"), area


def encode_masks(masks: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Image-sized binary masks ``(N, H, W)`` (bool or 0/1 uint8) -> (RLE counts strings,
    areas int64); each string decodes with ``{"size": [H, W], "counts": s.encode()}``."""
    det = Detections.from_full_masks(
        np.zeros((len(masks), 4), np.float32), np.zeros(len(masks)), np.zeros(len(masks)), masks
    )
    return encode_detections(det)


def encode_detections(det: Detections) -> tuple[list[str], np.ndarray]:
    """The RLE counts strings and areas of ``det``'s masks, in ``det``'s order."""
    height, width = det.image_size
    encoded = [
        encode_window(window, x, y, height, width)
        for (x, y), window in zip(det.mask_origins.tolist(), det.masks, strict=True)
    ]
    return [c for c, _ in encoded], np.array([a for _, a in encoded], dtype=np.int64)


def decode_mask(counts: str, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_masks` for one mask: uint8 ``(height, width)`` of 0/1."""
    decoded: np.ndarray = mask_utils.decode({"size": [height, width], "counts": counts.encode()})
    return decoded


# Between the model and the encoder a mask is its window: origin, size and the window's
# pixels row-major, packed 8 to a byte (numpy.packbits). These columns take the place of
# ``mask_rle`` and ``mask_area`` in :data:`WINDOWED_SCHEMA`, the model actors' output.
MASK_WINDOW_FIELDS = [
    pa.field("mask_x", pa.int32(), nullable=False),
    pa.field("mask_y", pa.int32(), nullable=False),
    pa.field("mask_w", pa.int32(), nullable=False),
    pa.field("mask_h", pa.int32(), nullable=False),
    pa.field("mask_bits", pa.binary(), nullable=False),
]
_WINDOW_NAMES = [f.name for f in MASK_WINDOW_FIELDS]
WINDOWED_SCHEMA = pa.schema(
    [
        g
        for f in INSTANCES_SCHEMA
        for g in (MASK_WINDOW_FIELDS if f.name == "mask_rle" else [f])
        if g.name != "mask_area"
    ]
)


def instances_table(
    refs: Sequence[ImageRef], detections: Sequence[Detections], categories: Sequence[str]
) -> pa.Table:
    """``instances`` rows for a batch of images; ``refs[i]`` describes ``detections[i]``.

    Rows within an image are ordered by descending score and ``instance_id`` is that rank.
    A batch without detections gives an empty table with the same schema.
    """
    return encode_instances(windowed_instances_table(refs, detections, categories))


def windowed_instances_table(
    refs: Sequence[ImageRef], detections: Sequence[Detections], categories: Sequence[str]
) -> pa.Table:
    """As :func:`instances_table`, with each mask as its packed window
    (:data:`WINDOWED_SCHEMA`): what the model actors emit; :func:`encode_instances` finishes."""
    if len(refs) != len(detections):
        raise ValueError(f"{len(refs)} image refs for {len(detections)} detection sets")
    columns: dict[str, list[np.ndarray]] = {name: [] for name in WINDOWED_SCHEMA.names}
    strings: dict[str, list[str]] = {"run_id": [], "image_id": [], "uri": [], "label": []}
    bits: list[bytes] = []
    for ref, det in zip(refs, detections, strict=True):
        n = len(det)
        if n == 0:
            continue
        if det.image_size != (ref.height, ref.width):
            height, width = det.image_size
            raise ValueError(
                f"detections of {ref.uri} are for a {width}x{height} image, "
                f"image is {ref.width}x{ref.height}"
            )
        order = np.argsort(-det.scores, kind="stable")
        labels = det.labels[order].astype(np.int32)
        boxes = det.boxes[order].astype(np.float32)
        windows = [det.masks[k] for k in order]
        bits.extend(np.packbits(w, axis=None).tobytes() for w in windows)
        strings["run_id"].extend([ref.run_id] * n)
        strings["image_id"].extend([ref.image_id] * n)
        strings["uri"].extend([ref.uri] * n)
        strings["label"].extend(_label_names(labels, categories))
        columns["instance_id"].append(np.arange(n, dtype=np.int32))
        columns["label_id"].append(labels)
        columns["score"].append(det.scores[order].astype(np.float32))
        for k, name in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
            columns[name].append(boxes[:, k])
        origins = det.mask_origins[order]
        columns["mask_x"].append(origins[:, 0])
        columns["mask_y"].append(origins[:, 1])
        columns["mask_w"].append(np.array([w.shape[1] for w in windows], dtype=np.int32))
        columns["mask_h"].append(np.array([w.shape[0] for w in windows], dtype=np.int32))
        columns["image_width"].append(np.full(n, ref.width, dtype=np.int32))
        columns["image_height"].append(np.full(n, ref.height, dtype=np.int32))
    arrays = []
    for field in WINDOWED_SCHEMA:
        if field.name in strings:
            arrays.append(pa.array(strings[field.name], type=field.type))
        elif field.name == "mask_bits":
            arrays.append(pa.array(bits, type=field.type))
        else:
            parts = columns[field.name]
            values = np.concatenate(parts) if parts else np.zeros(0)
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=WINDOWED_SCHEMA)


def encode_windows(
    windows: pa.Table | pa.StructArray, heights: np.ndarray, widths: np.ndarray
) -> tuple[pa.Array, pa.Array]:
    """``mask_rle`` and ``mask_area`` for rows holding the :data:`MASK_WINDOW_FIELDS`, row k
    of an image of ``heights[k]`` x ``widths[k]`` pixels."""
    get = windows.column if isinstance(windows, pa.Table) else windows.field
    xs, ys, ws, hs = (get(name).to_numpy() for name in _WINDOW_NAMES[:4])
    packed = get("mask_bits").to_pylist()
    counts: list[str] = []
    areas = np.zeros(len(packed), dtype=np.int64)
    for k, raw in enumerate(packed):
        h, w = int(hs[k]), int(ws[k])
        flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=h * w)
        window = flat.reshape(h, w).view(bool)
        rle, areas[k] = encode_window(
            window, int(xs[k]), int(ys[k]), int(heights[k]), int(widths[k])
        )
        counts.append(rle)
    return pa.array(counts, type=pa.string()), pa.array(areas, type=pa.int64())


def encode_instances(windowed: pa.Table) -> pa.Table:
    """:data:`WINDOWED_SCHEMA` rows -> ``instances`` rows (:data:`INSTANCES_SCHEMA`)."""
    heights = windowed.column("image_height").to_numpy()
    widths = windowed.column("image_width").to_numpy()
    rle, area = encode_windows(windowed, heights, widths)
    encoded = {"mask_rle": rle, "mask_area": area}
    arrays = [
        encoded[f.name] if f.name in encoded else windowed.column(f.name) for f in INSTANCES_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=INSTANCES_SCHEMA)


@dataclass(frozen=True)
class ImageRecord:
    """One ``images`` row; fields in :data:`IMAGES_SCHEMA` order."""

    run_id: str
    image_id: str
    uri: str
    width: int | None
    height: int | None
    status: str
    error_code: str | None
    error: str | None
    num_instances: int

    @classmethod
    def ok(cls, ref: ImageRef, num_instances: int) -> ImageRecord:
        return cls(
            ref.run_id,
            ref.image_id,
            ref.uri,
            ref.width,
            ref.height,
            STATUS_OK,
            None,
            None,
            num_instances,
        )

    @classmethod
    def failed(cls, run_id: str, image_id: str, uri: str, err: DecodeError) -> ImageRecord:
        return cls(
            run_id, image_id, uri, err.width, err.height, STATUS_ERROR, err.code, err.message, 0
        )


def images_table(records: Sequence[ImageRecord]) -> pa.Table:
    """One ``images`` row per input image, decoded or not."""
    columns = list(zip(*(astuple(r) for r in records), strict=True)) if records else None
    arrays = [
        pa.array(list(columns[i]) if columns else [], type=field.type)
        for i, field in enumerate(IMAGES_SCHEMA)
    ]
    return pa.Table.from_arrays(arrays, schema=IMAGES_SCHEMA)


def _label_names(labels: np.ndarray, categories: Sequence[str]) -> list[str]:
    return [categories[i] if 0 <= i < len(categories) else f"class_{i}" for i in labels.tolist()]
