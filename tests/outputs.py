"""Outputs written by the writer directly (no Ray, no model): fixtures for the readers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segpipe.core.detections import Detections
from segpipe.job.stages import image_rows
from segpipe.job.writer import write_rows
from segpipe.schema import image_id
from segpipe.tools.shapes import CATEGORIES, ShapesImage
from tests.masks import detections_from_full_masks

SHAPES_LABELS = ("__background__", *CATEGORIES)


def write_output(
    output: str,
    run_id: str,
    images: Sequence[tuple[str, tuple[int, int] | None, Detections | None]],
    categories: Sequence[str],
    extra: dict[str, Sequence[Any]] | None = None,
    partition_by: Sequence[str] = ("run_id",),
    errors: dict[str, tuple[str, str]] | None = None,
) -> None:
    """``images``: (uri, (width, height) or None for an undecodable file, detections);
    ``errors``: uri -> (error code, message) for the undecodable ones (default: corrupt)."""
    errors = errors or {}
    batch: dict[str, np.ndarray] = {
        "uri": np.array([uri for uri, _, _ in images], dtype=object),
        "image_id": np.array([image_id(uri) for uri, _, _ in images], dtype=object),
        "width": np.array([s[0] if s else -1 for _, s, _ in images], dtype=np.int32),
        "height": np.array([s[1] if s else -1 for _, s, _ in images], dtype=np.int32),
        "error_code": np.array(
            ["" if s else errors.get(u, ("corrupt",))[0] for u, s, _ in images], dtype=object
        ),
        "error": np.array(
            ["" if s else errors.get(u, ("", "corrupt image data"))[1] for u, s, _ in images],
            dtype=object,
        ),
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
    return detections_from_full_masks(
        boxes=np.array(boxes, dtype=np.float32).reshape(n, 4),
        labels=np.array([SHAPES_LABELS.index(s.category) for s in image.shapes], dtype=np.int64),
        scores=np.array([1.0 - k / 100 for k in range(n)], dtype=np.float32),
        masks=masks,
    )


COCO_LIKE_LABELS = ("__background__", "person", "bicycle", "car", "dog")
RUNS = ("r50-fpn", "r50-fpn-v2")


def coco_like_output(output: str, images: int = 30, seed: int = 0) -> None:
    """Two runs (``r50-fpn``, ``r50-fpn-v2``) of a COCO-style model over the same images of
    ``s3://photos/...``: people, bicycles, cars and dogs with elliptical masks inside their
    boxes, distinct scores, and three images that failed in both runs."""
    rng = np.random.default_rng(seed)
    uris = [f"s3://photos/2026/{k:04d}.jpg" for k in range(images)]
    sizes = [(int(rng.integers(200, 640)), int(rng.integers(200, 480))) for _ in uris]
    failed = {
        uris[3]: ("truncated", "truncated JPEG: ended after 1024 bytes"),
        uris[11]: ("not_an_image", "not an image: the bytes are an HTML document"),
        uris[17]: ("not_found", "no such object"),
    }
    used_scores: set[float] = set()
    for run in RUNS:
        rows: list[tuple[str, tuple[int, int] | None, Detections | None]] = []
        for uri, (width, height) in zip(uris, sizes, strict=True):
            if uri in failed:
                rows.append((uri, None, None))
                continue
            n = int(rng.integers(0, 7))
            boxes, masks, scores = [], np.zeros((n, height, width), dtype=bool), []
            for k in range(n):
                w, h = int(rng.integers(10, width // 2)), int(rng.integers(10, height // 2))
                x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
                cx, cy = x0 + w / 2, y0 + h / 2
                masks[k] = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
                boxes.append([x0, y0, x0 + w, y0 + h])
                score = round(float(rng.uniform(0.05, 1.0)), 4)
                while score in used_scores:
                    score = round(score + 0.0001, 4)
                used_scores.add(score)
                scores.append(score)
            order = np.argsort(scores)[::-1]
            det = detections_from_full_masks(
                boxes=np.array(boxes, dtype=np.float32).reshape(n, 4)[order],
                labels=rng.choice([1, 1, 1, 2, 3, 4], size=n).astype(np.int64),
                scores=np.array(scores, dtype=np.float32)[order],
                masks=masks[order],
            )
            rows.append((uri, (width, height), det))
        write_output(output, run, rows, COCO_LIKE_LABELS, errors=failed)
