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
from dataclasses import dataclass
from typing import IO, Any

import duckdb
import fsspec

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
    sql = (
        f"WITH numbered AS ({_NUMBERED}) SELECT n.coco_id, i.label_id, i.score, i.box_x0, "
        "i.box_y0, i.box_x1, i.box_y1, i.mask_rle, i.image_height, i.image_width "
        "FROM instances i JOIN numbered n ON i.uri = n.uri "
        "WHERE i.run_id = ? AND i.score >= ? ORDER BY n.coco_id, i.instance_id"
    )
    results = 0
    with fsspec.open(results_uri, "w", encoding="utf-8") as f:
        rows = (
            {
                "image_id": int(coco_id),
                "category_id": int(label_id),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": round(float(score), 5),
                "segmentation": {"size": [int(h), int(w)], "counts": rle},
            }
            for coco_id, label_id, score, x0, y0, x1, y1, rle, h, w in iter_rows(
                con, sql, [run_id, run_id, min_score]
            )
        )
        results = _write_array(f, rows)
    categories = con.execute(
        "SELECT DISTINCT label_id, label FROM instances WHERE run_id = ? ORDER BY label_id",
        [run_id],
    ).fetchall()
    images = 0
    if dataset_uri is not None:
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
    return ExportCounts(images=images, results=results, categories=len(categories))


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
