"""COCO evaluation of an output against ground-truth annotations (pycocotools' COCOeval).

Matching: an output image matches the ground-truth image whose ``file_name`` ends its URI's
path (``s3://b/val/0001.png`` <-> ``"file_name": "0001.png"`` or ``"val/0001.png"``), or, if
asked, the one whose id is in a given column of the ``images`` table (carried from the
manifest). A predicted ``label`` matches the ground-truth category of the same name;
predictions of labels the annotations don't know are left out (and counted). Ground-truth
images that the output does not hold are still evaluated, so what the job lost counts as
missed. COCOeval holds the ground truth and the matched predictions in memory.

Boxes go to COCO as ``[x0, y0, x1 - x0, y1 - y0]`` (the same continuous pixel coordinates
pycocotools uses for boxes computed from masks); masks go as the stored compressed RLE.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe.analytics.coco import coco_result
from segpipe.analytics.query import iter_rows, pick_run
from segpipe.core.detections import Detections
from segpipe.core.encode import encode_detections

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


@dataclass(frozen=True)
class CocoMetrics:
    stats: dict[str, dict[str, float]]  # iou type -> the 12 numbers by STAT_NAMES
    tables: dict[str, str]  # iou type -> COCOeval.summarize()'s printed table

    def as_json(self) -> dict[str, Any]:
        return {"stats": self.stats}


def predictions(
    con: duckdb.DuckDBPyConnection,
    gt: Mapping[str, Any],
    run_id: str | None = None,
    image_id_column: str | None = None,
) -> Predictions:
    """The instances of one run of an output (a connection from
    :func:`segpipe.analytics.query.connect`) as COCO results for the ground truth ``gt`` (a COCO
    instances dict).

    Images match by file name: a ground-truth ``file_name`` (``0001.png`` or
    ``val2017/0001.png``) matches the output URI whose path ends with it. With
    ``image_id_column``, they match instead by that column of the ``images`` table (a
    manifest column carried into it) holding the ground-truth image id.
    """
    run_id = pick_run(con, run_id)
    categories = {str(c["name"]): int(c["id"]) for c in gt["categories"]}
    if image_id_column is not None:
        image_ids = _image_ids_by_column(con, gt, run_id, image_id_column)
    else:
        image_ids = _image_ids_by_file_name(con, gt, run_id)
    out = Predictions()
    out.images_matched = sum(v is not None for v in image_ids.values())
    out.images_unmatched = len(image_ids) - out.images_matched
    if out.images_matched == 0:
        raise EvaluationError(
            f"none of the {len(image_ids)} images of run {run_id!r} matches an image of the "
            "annotations (by file name"
            + (f" or by column {image_id_column!r}" if image_id_column else "")
            + ")"
        )
    sql = (
        "SELECT uri, label, score, box_x0, box_y0, box_x1, box_y1, mask_rle, image_height, "
        "image_width FROM instances WHERE run_id = ? ORDER BY uri, instance_id"
    )
    for uri, label, score, x0, y0, x1, y1, rle, height, width in iter_rows(con, sql, [run_id]):
        image_id = image_ids.get(uri)
        if image_id is None:
            continue
        category = categories.get(label)
        if category is None:
            out.unknown_labels[label] = out.unknown_labels.get(label, 0) + 1
            continue
        out.results.append(
            coco_result(image_id, category, (x0, y0, x1, y1), score, (height, width), rle)
        )
    return out


def _image_ids_by_column(
    con: duckdb.DuckDBPyConnection, gt: Mapping[str, Any], run_id: str, column: str
) -> dict[str, int | None]:
    """The ground-truth image id of each URI of the run, read from ``column`` of the
    ``images`` table (None: empty, or not an image of ``gt``)."""
    columns = [c for (c,) in con.execute("SELECT column_name FROM (DESCRIBE images)").fetchall()]
    if column not in columns:
        raise EvaluationError(f"the images table has no column {column!r}")
    known = {int(image["id"]) for image in gt["images"]}
    image_ids: dict[str, int | None] = {}
    for uri, value in iter_rows(
        con, f'SELECT uri, "{column}" FROM images WHERE run_id = ?', [run_id]
    ):
        coco_id = int(value) if value is not None and str(value).strip() else None
        image_ids[uri] = coco_id if coco_id in known else None
    return image_ids


def _image_ids_by_file_name(
    con: duckdb.DuckDBPyConnection, gt: Mapping[str, Any], run_id: str
) -> dict[str, int | None]:
    """The ground-truth image id of each URI of the run, by file name (None: no match)."""
    by_name = _by_file_name(gt)
    return {
        uri: _match_file_name(uri, by_name)
        for (uri,) in iter_rows(con, "SELECT uri FROM images WHERE run_id = ?", [run_id])
    }


def detection_results(
    detections: Detections,
    image_id: int,
    model_categories: Sequence[str],
    gt_categories: Mapping[str, int],
) -> list[dict[str, Any]]:
    """One image's detections (straight from the model) as COCO results, encoded exactly as
    the pipeline encodes them."""
    counts, _ = encode_detections(detections)
    results = []
    for box, label, score, rle in zip(
        detections.boxes, detections.labels, detections.scores, counts, strict=True
    ):
        category = gt_categories.get(model_categories[int(label)])
        if category is None:
            continue
        results.append(coco_result(image_id, category, box, score, detections.image_size, rle))
    return results


def evaluate(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
) -> CocoMetrics:
    """COCOeval of ``results`` against ``gt`` for each IoU type: the 12 standard numbers
    (-1 where COCO has nothing to measure) and the table pycocotools prints. No results at
    all score 0."""
    coco_gt = coco_from_dict(gt)
    stats: dict[str, dict[str, float]] = {}
    tables: dict[str, str] = {}
    for iou_type in iou_types:
        if not results:
            stats[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            tables[iou_type] = "(no predictions)"
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            evaluator.summarize()
        values = np.asarray(evaluator.stats, dtype=float)
        stats[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, values, strict=True)}
        tables[iou_type] = printed.getvalue().rstrip()
    return CocoMetrics(stats, tables)


def coco_from_dict(gt: Mapping[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def format_metrics(metrics: CocoMetrics) -> str:
    """A small table: one row per IoU type, the AP columns."""
    columns = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
    lines = [f"{'':6}" + "".join(f"{c:>10}" for c in columns)]
    for iou_type, stats in metrics.stats.items():
        lines.append(f"{iou_type:6}" + "".join(f"{stats[c]:>10.3f}" for c in columns))
    return "\n".join(lines)


def _by_file_name(gt: Mapping[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Ground-truth images by the last component of their file name."""
    by_name: dict[str, list[tuple[str, int]]] = {}
    seen: set[str] = set()
    for image in gt["images"]:
        file_name = str(image["file_name"]).strip("/")
        if file_name in seen:
            raise EvaluationError(f"two ground-truth images have the file name {file_name!r}")
        seen.add(file_name)
        by_name.setdefault(file_name.rsplit("/", 1)[-1], []).append((file_name, int(image["id"])))
    return by_name


def _match_file_name(uri: str, by_name: Mapping[str, list[tuple[str, int]]]) -> int | None:
    path = uri.split("://", 1)[-1]
    candidates = [
        (name, image_id)
        for name, image_id in by_name.get(path.rsplit("/", 1)[-1], [])
        if path == name or path.endswith("/" + name)
    ]
    if len(candidates) > 1:  # "a/x.png" and "x.png" both fit ".../a/x.png": the longest wins
        candidates.sort(key=lambda c: len(c[0]), reverse=True)
    return candidates[0][1] if candidates else None
