"""Test helpers between image-sized masks and segpipe's detections and rows.

The library never makes an image-sized mask (masks are windows around their boxes); tests
that state their expectations as whole masks convert here, and get the rows a run writes
through the functions a run uses (:func:`image_rows`, then :func:`split_tables`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from segpipe.core.detections import Detections
from segpipe.core.rows import ImageRef
from segpipe.job.stages import image_rows, split_tables
from segpipe.schema import STATUS_OK


def detections_from_full_masks(
    boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray
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
    return Detections(boxes, labels, scores, windows, origins, size)


def full_masks(det: Detections) -> np.ndarray:
    """``det``'s masks as image-sized bool ``(N, H, W)``."""
    out = np.zeros((len(det), *det.image_size), dtype=bool)
    for k, ((x, y), window) in enumerate(zip(det.mask_origins.tolist(), det.masks, strict=True)):
        h, w = window.shape
        out[k, y : y + h, x : x + w] = window
    return out


def instances_rows(
    refs: Sequence[ImageRef], detections: Sequence[Detections], categories: Sequence[str]
) -> pa.Table:
    """The ``instances`` rows a run writes for these images (``refs[i]`` describes
    ``detections[i]``; one run id), made as a run makes them."""
    run_ids = {ref.run_id for ref in refs}
    assert len(run_ids) <= 1, f"one run id, got {run_ids}"
    n = len(refs)
    batch = {
        "uri": np.array([r.uri for r in refs], dtype=object),
        "image_id": np.array([r.image_id for r in refs], dtype=object),
        "width": np.array([r.width for r in refs], dtype=np.int32),
        "height": np.array([r.height for r in refs], dtype=np.int32),
        "status": np.array([STATUS_OK] * n, dtype=object),
        "error_code": np.array([""] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
    }
    rows = image_rows(batch, next(iter(run_ids), "run"), dict(enumerate(detections)), categories)
    return split_tables(rows)[1]
