"""Mask windows -> COCO RLE, and back.

Masks are stored as COCO compressed RLE (pycocotools), whose run lengths are counted in
column-major (Fortran) order over the whole image. :func:`encode_window` computes those runs
from a mask's window (:mod:`segpipe.core.detections`) directly: in column-major order a
window's pixels lie in ``w`` stretches, one per column, separated by the image rows above and
below it. Between the model actors and the encoder a window travels packed
(:data:`MASK_WINDOW_FIELDS`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segpipe.core.detections import Detections


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


def encode_detections(det: Detections) -> tuple[list[str], np.ndarray]:
    """The RLE counts strings and areas of ``det``'s masks, in ``det``'s order."""
    height, width = det.image_size
    encoded = [
        encode_window(window, x, y, height, width)
        for (x, y), window in zip(det.mask_origins.tolist(), det.masks, strict=True)
    ]
    return [c for c, _ in encoded], np.array([a for _, a in encoded], dtype=np.int64)


def decode_mask(counts: str, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_window`: uint8 ``(height, width)`` of 0/1."""
    decoded: np.ndarray = mask_utils.decode({"size": [height, width], "counts": counts.encode()})
    return decoded


# Between the model and the encoder a mask is its window: origin, size and the window's
# pixels row-major, packed 8 to a byte (numpy.packbits). These columns take the place of
# ``mask_rle`` and ``mask_area`` in ``rows.WINDOWED_SCHEMA``, the model actors' output.
MASK_WINDOW_FIELDS = [
    pa.field("mask_x", pa.int32(), nullable=False),
    pa.field("mask_y", pa.int32(), nullable=False),
    pa.field("mask_w", pa.int32(), nullable=False),
    pa.field("mask_h", pa.int32(), nullable=False),
    # Large (64-bit offsets): full-resolution windows of a batch of photos can pass 2 GiB.
    pa.field("mask_bits", pa.large_binary(), nullable=False),
]
_WINDOW_NAMES = [f.name for f in MASK_WINDOW_FIELDS]


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
    return pa.array(counts, type=pa.large_string()), pa.array(areas, type=pa.int64())
