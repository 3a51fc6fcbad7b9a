"""COCO evaluation of an output against ground-truth annotations (pycocotools' COCOeval).

Matching: an output image matches the ground-truth image whose ``file_name`` is the last
path component of its URI (``s3://b/val/0001.png`` <-> ``"file_name": "0001.png"``), and a
predicted ``label`` matches the ground-truth category of the same name; predictions of
labels the annotations don't know are left out (and counted). Ground-truth images that the
output does not hold are still evaluated, so what the job lost counts as missed.

Boxes go to COCO as ``[x0, y0, x1 - x0, y1 - y0]`` (the same continuous pixel coordinates
pycocotools uses for boxes computed from masks); masks go as the stored compressed RLE.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe.encode import Detections, encode_masks

# The 12 numbers COCOeval.summarize() prints, in its order.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


class EvaluationError(ValueError):
    """The annotations and the output cannot be matched."""


@dataclass
class Predictions:
    results: list[dict[str, Any]] = field(default_factory=list)
    images_matched: int = 0
    images_unmatched: int = 0  # output images with no ground-truth entry
    unknown_labels: dict[str, int] = field(default_factory=dict)


def predictions(
    con: duckdb.DuckDBPyConnection, gt: Mapping[str, Any], run_id: str | None = None
) -> Predictions:
    """The instances of an output (a connection from :func:`segpipe.query.connect`) as COCO
    results for the ground truth ``gt`` (a COCO instances dict)."""
    by_name: dict[str, int] = {}
    for image in gt["images"]:
        name = str(image["file_name"]).rsplit("/", 1)[-1]
        if name in by_name:
            raise EvaluationError(f"two ground-truth images are named {name!r}")
        by_name[name] = int(image["id"])
    categories = {str(c["name"]): int(c["id"]) for c in gt["categories"]}
    where, params = ("WHERE run_id = ?", [run_id]) if run_id is not None else ("", [])
    out = Predictions()
    image_ids: dict[str, int | None] = {}
    for uri, *_ in _rows(con, f"SELECT uri FROM images {where}", params):
        image_ids[uri] = by_name.get(uri.rsplit("/", 1)[-1])
    out.images_matched = sum(v is not None for v in image_ids.values())
    out.images_unmatched = len(image_ids) - out.images_matched
    sql = (
        "SELECT uri, label, score, box_x0, box_y0, box_x1, box_y1, mask_rle, image_height, "
        f"image_width FROM instances {where} ORDER BY uri, instance_id"
    )
    for uri, label, score, x0, y0, x1, y1, rle, height, width in _rows(con, sql, params):
        image_id = image_ids.get(uri)
        if image_id is None:
            continue
        category = categories.get(label)
        if category is None:
            out.unknown_labels[label] = out.unknown_labels.get(label, 0) + 1
            continue
        out.results.append(
            {
                "image_id": image_id,
                "category_id": category,
                "score": float(score),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "segmentation": {"size": [int(height), int(width)], "counts": rle},
            }
        )
    return out


def detection_results(
    detections: Detections,
    image_id: int,
    model_categories: Sequence[str],
    gt_categories: Mapping[str, int],
) -> list[dict[str, Any]]:
    """One image's detections (straight from the model) as COCO results, encoded exactly as
    the pipeline encodes them."""
    counts, _ = encode_masks(detections.masks)
    height, width = detections.masks.shape[1:]
    results = []
    for box, label, score, rle in zip(
        detections.boxes, detections.labels, detections.scores, counts, strict=True
    ):
        category = gt_categories.get(model_categories[int(label)])
        if category is None:
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        results.append(
            {
                "image_id": image_id,
                "category_id": category,
                "score": float(score),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": {"size": [int(height), int(width)], "counts": rle},
            }
        )
    return results


def evaluate(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
) -> dict[str, dict[str, float]]:
    """COCOeval of ``results`` against ``gt`` for each IoU type: ``{"segm": {"AP": ...,
    "AP50": ..., ...}}`` with the 12 standard numbers (-1 where COCO has nothing to
    measure). No results at all score 0."""
    coco_gt = coco_from_dict(gt)
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if not results:
            metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = np.asarray(evaluator.stats, dtype=float)
        metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, stats, strict=True)}
    return metrics


def coco_from_dict(gt: Mapping[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A small table: one row per IoU type, the AP columns."""
    columns = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
    lines = [f"{'':6}" + "".join(f"{c:>10}" for c in columns)]
    for iou_type, stats in metrics.items():
        lines.append(f"{iou_type:6}" + "".join(f"{stats[c]:>10.3f}" for c in columns))
    return "\n".join(lines)


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> Iterator[tuple[Any, ...]]:
    """Rows of a query, fetched in chunks rather than all at once."""
    cursor = con.execute(sql, params)
    while chunk := cursor.fetchmany(10_000):
        yield from chunk
