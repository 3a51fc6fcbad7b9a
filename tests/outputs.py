"""Outputs written by the writer directly (no Ray, no model): fixtures for the readers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.encode import Detections
from segpipe.schema import image_id
from segpipe.shapes import CATEGORIES, ShapesImage
from segpipe.stages import image_rows
from segpipe.writer import write_rows

SHAPES_LABELS = ("__background__", *CATEGORIES)


def write_output(
    output: str,
    run_id: str,
    images: Sequence[tuple[str, tuple[int, int] | None, Detections | None]],
    categories: Sequence[str],
    extra: dict[str, Sequence[Any]] | None = None,
    partition_by: Sequence[str] = ("run_id",),
) -> None:
    """``images``: (uri, (width, height) or None for an undecodable file, detections)."""
    batch: dict[str, np.ndarray] = {
        "uri": np.array([uri for uri, _, _ in images], dtype=object),
        "image_id": np.array([image_id(uri) for uri, _, _ in images], dtype=object),
        "width": np.array([s[0] if s else -1 for _, s, _ in images], dtype=np.int32),
        "height": np.array([s[1] if s else -1 for _, s, _ in images], dtype=np.int32),
        "error_code": np.array(["" if s else "corrupt" for _, s, _ in images], dtype=object),
        "error": np.array(["" if s else "corrupt image data" for _, s, _ in images], dtype=object),
    }
    for name, values in (extra or {}).items():
        batch[name] = np.array(list(values), dtype=object)
    detections = {i: d for i, (_, s, d) in enumerate(images) if s is not None and d is not None}
    write_rows(image_rows(batch, run_id, detections, categories), output, partition_by=partition_by)


def ground_truth_detections(image: ShapesImage, shift: int = 0) -> Detections:
    """The image's exact shapes as detections (score 1 - rank/100), optionally moved
    ``shift`` pixels to the right."""
    masks = (
        np.stack([s.mask for s in image.shapes])
        if image.shapes
        else np.zeros((0, *image.pixels.shape[:2]), dtype=bool)
    )
    if shift:
        moved = np.zeros_like(masks)
        moved[:, :, shift:] = masks[:, :, :-shift]
        masks = moved
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    n = len(masks)
    return Detections(
        boxes=np.array(boxes, dtype=np.float32).reshape(n, 4),
        labels=np.array([SHAPES_LABELS.index(s.category) for s in image.shapes], dtype=np.int64),
        scores=np.array([1.0 - k / 100 for k in range(n)], dtype=np.float32),
        masks=masks,
    )
