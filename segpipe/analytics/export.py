"""Export one run of an output as COCO JSON for other tools (pycocotools, FiftyOne, CVAT).

- Results (``[{"image_id", "category_id", "bbox", "score", "segmentation"}, ...]``): boxes as
  ``[x, y, width, height]`` in pixels, masks as the stored compressed RLE.
- Dataset (optional): ``{"images", "annotations": [], "categories"}``, the images the results
  refer to. COCO image ids are 1..N over the run's decoded images ordered by URI; each image
  carries its URI as ``coco_url``, its segpipe ``image_id`` as ``segpipe_image_id`` and, as
  ``file_name``, the URI's path without scheme or bucket (``s3://b/val/1.jpg`` ->
  ``val/1.jpg``), so a tool pointed at the bucket root or the local root finds the files.
  Category ids are the model's label ids, which for COCO models are COCO's own category ids.

Both files are written row by row: the export never holds the run in memory (DuckDB does the
numbering and the join, spilling to disk if it must).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import duckdb
import fsspec

from segpipe.analytics.coco import coco_result
from segpipe.analytics.query import iter_rows

_NUMBERED = (
    "SELECT uri, image_id, width, height, "
    "row_number() OVER (ORDER BY uri) AS coco_id FROM images WHERE run_id = ? AND status = 'ok'"
)


@dataclass(frozen=True)
class ExportCounts:
    images: int
    results: int
    categories: int


def export_coco(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    results_uri: str,
    dataset_uri: str | None = None,
    min_score: float = 0.0,
) -> ExportCounts:
    """Write the COCO results (and dataset) of ``run_id`` from a
    :func:`segpipe.analytics.query.connect` connection. ``min_score`` leaves out weaker
    detections."""
    results = _write_results(con, run_id, results_uri, min_score)
    categories = con.execute(
        "SELECT DISTINCT label_id, label FROM instances WHERE run_id = ? ORDER BY label_id",
        [run_id],
    ).fetchall()
    images = 0
    if dataset_uri is not None:
        images = _write_dataset(con, run_id, dataset_uri, categories)
    return ExportCounts(images=images, results=results, categories=len(categories))


def _write_results(
    con: duckdb.DuckDBPyConnection, run_id: str, results_uri: str, min_score: float
) -> int:
    """Write the results file: the run's detections scoring ``min_score`` or more, by COCO
    image id, scores rounded to 5 decimals. Returns how many."""
    sql = (
        f"WITH numbered AS ({_NUMBERED}) SELECT n.coco_id, i.label_id, i.score, i.box_x0, "
        "i.box_y0, i.box_x1, i.box_y1, i.mask_rle, i.image_height, i.image_width "
        "FROM instances i JOIN numbered n ON i.uri = n.uri "
        "WHERE i.run_id = ? AND i.score >= ? ORDER BY n.coco_id, i.instance_id"
    )
    with fsspec.open(results_uri, "w", encoding="utf-8") as f:
        rows = (
            coco_result(coco_id, label_id, (x0, y0, x1, y1), score, (h, w), rle, score_digits=5)
            for coco_id, label_id, score, x0, y0, x1, y1, rle, h, w in iter_rows(
                con, sql, [run_id, run_id, min_score]
            )
        )
        return _write_array(f, rows)


def _write_dataset(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    dataset_uri: str,
    categories: Sequence[tuple[int, str]],
) -> int:
    """Write the dataset file: the run's decoded images numbered 1..N by URI, no
    annotations, and ``categories`` (``(label_id, label)``). Returns how many images."""
    with fsspec.open(dataset_uri, "w", encoding="utf-8") as f:
        f.write('{"info": {"description": ' + json.dumps(f"segpipe run {run_id}") + "},\n")
        f.write('"images": ')
        entries = (
            {
                "id": int(coco_id),
                "file_name": relative_path(uri),
                "coco_url": uri,
                "width": int(width),
                "height": int(height),
                "segpipe_image_id": image_id,
            }
            for uri, image_id, width, height, coco_id in iter_rows(
                con, f"{_NUMBERED} ORDER BY coco_id", [run_id]
            )
        )
        images = _write_array(f, entries)
        f.write(',\n"annotations": [],\n"categories": ')
        f.write(json.dumps([{"id": int(i), "name": name} for i, name in categories]))
        f.write("}\n")
    return images


def relative_path(uri: str) -> str:
    """``s3://bucket/a/b.jpg`` -> ``a/b.jpg``; ``file:///data/a/b.jpg`` -> ``data/a/b.jpg``."""
    scheme, _, rest = uri.partition("://")
    if not rest:
        return uri.lstrip("/")
    if scheme in ("file", "local"):
        return rest.lstrip("/")
    return rest.split("/", 1)[-1]


def _write_array(f: IO[str], items: Any) -> int:
    count = 0
    f.write("[")
    for item in items:
        f.write(",\n" if count else "\n")
        f.write(json.dumps(item, separators=(",", ":")))
        count += 1
    f.write("\n]" if count else "]")
    return count
