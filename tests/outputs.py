"""Outputs written by the writer directly (no Ray, no model): fixtures for the readers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    boxes, distinct scores, and three images that failed in both runs. The second run sees
    most of the first run's objects again, moved a few pixels (some relabelled, some missed,
    a few new ones). The first image holds two near-copies of one person in both runs
    (a likely duplicate) and the second a dog inside a car."""
    rng = np.random.default_rng(seed)
    uris = [f"s3://photos/2026/{k:04d}.jpg" for k in range(images)]
    sizes = [(int(rng.integers(200, 640)), int(rng.integers(200, 480))) for _ in uris]
    failed = {
        uris[3]: ("truncated", "truncated JPEG: ended after 1024 bytes"),
        uris[11]: ("not_an_image", "not an image: the bytes are an HTML document"),
        uris[17]: ("not_found", "no such object"),
    }
    used_scores: set[float] = set()

    def score() -> float:  # distinct over the whole output, so that orders are total
        value = round(float(rng.uniform(0.05, 1.0)), 4)
        while value in used_scores:
            value = round(value + 0.0001, 4)
        used_scores.add(value)
        return value

    def random_object(width: int, height: int) -> list[int]:  # x0, y0, w, h, label
        w, h = int(rng.integers(10, width // 2)), int(rng.integers(10, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        return [x0, y0, w, h, int(rng.choice([1, 1, 1, 2, 3, 4]))]

    first: dict[str, list[list[int]]] = {}
    for run in RUNS:
        rows: list[tuple[str, tuple[int, int] | None, Detections | None]] = []
        for k, (uri, (width, height)) in enumerate(zip(uris, sizes, strict=True)):
            if uri in failed:
                rows.append((uri, None, None))
                continue
            if run == RUNS[0]:
                objects = [random_object(width, height) for _ in range(int(rng.integers(0, 7)))]
                if k == 0:  # one person twice, 3 pixels apart
                    objects += [[20, 30, 60, 120, 1], [23, 30, 60, 120, 1]]
                if k == 1:  # a dog inside a car
                    objects += [[10, 20, 160, 100, 3], [60, 50, 40, 30, 4]]
                first[uri] = objects
            else:
                objects = [_seen_again(o, k, rng) for o in first[uri] if rng.random() > 0.15]
                objects += [random_object(width, height) for _ in range(int(rng.integers(0, 2)))]
            rows.append((uri, (width, height), _ellipses(objects, width, height, score)))
        write_output(output, run, rows, COCO_LIKE_LABELS, errors=failed)


def _seen_again(obj: list[int], image: int, rng: np.random.Generator) -> list[int]:
    """An object of the first run as the second sees it: moved up to 3 pixels, now and then
    relabelled (never the deliberate duplicates and containment of images 0 and 1)."""
    x0, y0, w, h, label = obj
    if image > 1 and rng.random() < 0.1:
        label = label % 4 + 1
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    return [max(0, x0 + dx), max(0, y0 + dy), w, h, label]


def _ellipses(
    objects: Sequence[list[int]], width: int, height: int, score: Callable[[], float]
) -> Detections:
    """Detections of elliptical masks filling the boxes ``(x0, y0, w, h, label)``, by
    descending score."""
    n = len(objects)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    masks = np.zeros((n, height, width), dtype=bool)
    for k, (x0, y0, w, h, _) in enumerate(objects):
        w, h = min(w, width - x0), min(h, height - y0)
        cx, cy = x0 + w / 2, y0 + h / 2
        masks[k] = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
    boxes = np.array(
        [[x0, y0, min(x0 + w, width), min(y0 + h, height)] for x0, y0, w, h, _ in objects],
        dtype=np.float32,
    ).reshape(n, 4)
    scores = np.array([score() for _ in objects], dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    return detections_from_full_masks(
        boxes=boxes[order],
        labels=np.array([o[4] for o in objects], dtype=np.int64).reshape(n)[order],
        scores=scores[order],
        masks=masks[order],
    )
