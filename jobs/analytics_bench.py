"""How fast the readers go on a large output: `python jobs/analytics_bench.py [--images N]`.

Writes (once, into ``--output``; reused when it is there) an output of two runs ``a`` and
``b`` over ``--images`` images of 1024 x 768 with ``--per-image`` elliptical masks each,
through the job's own writer; run ``b`` sees ``a``'s objects again moved 2 pixels, 10 % of
them missed, 5 % relabelled, plus a new one now and then. Then it times, each the median of
``--repeat`` runs:

- the SQL mask functions (segpipe/analytics/mask_sql.py) over ``a``'s instances in DuckDB
  on one thread, in rows/s, and the README's cross-run match query (boxes, then mask_iou);
- ``segpipe compare`` (without the AP sample, and with the default 5,000 images);
- ``segpipe report``.

    .venv/bin/python jobs/analytics_bench.py --images 20000 --output /tmp/analytics-bench
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np

from segpipe.analytics.compare import compare
from segpipe.analytics.mask_sql import register_duckdb
from segpipe.analytics.query import connect
from segpipe.analytics.report import write_report
from segpipe.core.detections import Detections
from segpipe.job.stages import image_rows
from segpipe.job.writer import write_rows
from segpipe.schema import image_id

HEIGHT, WIDTH = 768, 1024
LABELS = ("__background__", "person", "bicycle", "car", "dog")
FUNCTIONS = {
    "mask_area": "sum(mask_area(mask_rle, image_height, image_width))",
    "mask_bbox": "sum(mask_bbox(mask_rle, image_height, image_width).x1)",
    "mask_intersection": "sum(mask_intersection(mask_rle, mask_rle, image_height, image_width))",
    "mask_iou": "sum(mask_iou(mask_rle, mask_rle, image_height, image_width))",
}
MATCH = """
SELECT count(*) FROM instances a JOIN instances b ON b.image_id = a.image_id
WHERE a.run_id = 'a' AND b.run_id = 'b'
  AND a.box_x0 < b.box_x1 AND b.box_x0 < a.box_x1 AND a.box_y0 < b.box_y1 AND b.box_y0 < a.box_y1
  AND mask_iou(a.mask_rle, b.mask_rle, a.image_height, a.image_width) >= 0.5
"""


def detections(objects: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> Detections:
    """Ellipses filling the boxes ``objects`` (x0, y0, w, h), as mask windows."""
    windows, origins = [], []
    for x0, y0, w, h in objects.tolist():
        ys, xs = np.mgrid[0:h, 0:w] + 0.5
        windows.append(((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1)
        origins.append((x0, y0))
    boxes = np.concatenate([objects[:, :2], objects[:, :2] + objects[:, 2:]], axis=1)
    order = np.argsort(-scores, kind="stable")
    return Detections(
        boxes.astype(np.float32)[order],
        labels.astype(np.int64)[order],
        scores.astype(np.float32)[order],
        [windows[k] for k in order],
        np.array(origins, dtype=np.int32).reshape(-1, 2)[order],
        (HEIGHT, WIDTH),
    )


def write_runs(output: str, images: int, per_image: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, images, 1000):
        uris = [f"s3://bench/{k:08d}.jpg" for k in range(start, min(images, start + 1000))]
        batch = {
            "uri": np.array(uris, dtype=object),
            "image_id": np.array([image_id(u) for u in uris], dtype=object),
            "width": np.full(len(uris), WIDTH, dtype=np.int32),
            "height": np.full(len(uris), HEIGHT, dtype=np.int32),
            "error_code": np.array([""] * len(uris), dtype=object),
            "error": np.array([""] * len(uris), dtype=object),
        }
        runs: dict[str, dict[int, Detections]] = {"a": {}, "b": {}}
        for i in range(len(uris)):
            size = rng.integers(20, 300, size=(per_image, 2))
            corner = rng.integers(0, [WIDTH, HEIGHT], size=(per_image, 2)) % (
                [WIDTH, HEIGHT] - size
            )
            objects = np.concatenate([corner, size], axis=1)
            labels, scores = rng.integers(1, 5, per_image), rng.uniform(0.05, 1, per_image)
            runs["a"][i] = detections(objects, labels, scores)
            seen = rng.uniform(size=per_image) > 0.1
            moved = objects[seen] + [2, 2, 0, 0]
            moved[:, :2] = np.minimum(moved[:, :2], [WIDTH, HEIGHT] - moved[:, 2:])
            relabelled = np.where(rng.uniform(size=seen.sum()) < 0.05, 1, labels[seen])
            jitter = np.clip(scores[seen] + rng.normal(0, 0.02, seen.sum()), 0.05, 1)
            runs["b"][i] = detections(moved, relabelled, jitter)
        for run, found in runs.items():
            write_rows(image_rows(batch, run, found, LABELS), output, partition_by=("run_id",))


def median_seconds(repeat: int, work: Callable[[], object]) -> float:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--per-image", type=int, default=8)
    parser.add_argument("--output", help="where the output is (made when missing)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    output = args.output or tempfile.mkdtemp(prefix="analytics-bench-")
    if not (Path(output) / "instances").exists():
        start = time.perf_counter()
        write_runs(output, args.images, args.per_image)
        print(f"wrote {output} in {time.perf_counter() - start:.0f} s")
    con = connect(output)
    (rows,) = con.execute("SELECT count(*) FROM instances WHERE run_id = 'a'").fetchone() or (0,)
    print(f"{output}: {rows:,} instances in run a, 1024x768 images")
    one = duckdb.connect(config={"threads": 1})
    one.execute(f"CREATE TABLE instances AS SELECT * FROM read_parquet('{output}/instances/**')")
    register_duckdb(one)
    for name, expr in FUNCTIONS.items():
        sql = f"SELECT {expr} FROM instances WHERE run_id = 'a'"
        s = median_seconds(args.repeat, lambda sql=sql: one.execute(sql).fetchall())
        print(f"{name:18} {rows / s:>10,.0f} rows/s on one thread")
    s = median_seconds(args.repeat, lambda: one.execute(MATCH).fetchall())
    print(f"cross-run match    {rows / s:>10,.0f} instances of a/s ({s:.1f} s) on one thread")
    for ap in (0, 5000):
        s = median_seconds(args.repeat, lambda ap=ap: compare(con, "a", "b", ap_images=ap))
        print(f"compare, AP sample {ap:>5}: {s:6.1f} s, {2 * rows / s:>8,.0f} instances/s")
    with tempfile.TemporaryDirectory() as to:
        s = median_seconds(args.repeat, lambda: write_report(con, "a", to))
    print(f"report: {s:.1f} s")


if __name__ == "__main__":
    main()
