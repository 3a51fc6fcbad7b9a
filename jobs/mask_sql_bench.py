"""How fast the SQL mask functions go: `python jobs/mask_sql_bench.py [--rows N] [--repeat R]`.

Builds ``--rows`` pairs of photo-sized masks (1024 x 768 images, ellipses of 40-400 pixels
across, the second of each pair moved a few pixels: the shape of a cross-run match) as
COCO RLE in a DuckDB table on one thread, then times each function over the whole table
(the median of ``--repeat`` runs) and prints rows per second. The functions are those that
``segpipe.analytics.query.connect`` defines (segpipe/analytics/mask_sql.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import duckdb
import numpy as np

from segpipe.analytics.mask_sql import register_duckdb
from segpipe.core.encode import encode_window

HEIGHT, WIDTH = 768, 1024
QUERIES = {
    "mask_iou": "sum(mask_iou(a, b, h, w))",
    "mask_intersection": "sum(mask_intersection(a, b, h, w))",
    "mask_area": "sum(mask_area(a, h, w))",
    "mask_bbox": "sum(mask_bbox(a, h, w).x1)",
    "(box test only)": "count(*) FILTER (WHERE ax0 < bx1 AND bx0 < ax1)",
}


def ellipse_rle(rng: np.random.Generator, shift: int) -> tuple[str, int]:
    w, h = (int(v) for v in rng.integers(40, 400, size=2))
    x, y = int(rng.integers(0, WIDTH - w - 8)) + shift, int(rng.integers(0, HEIGHT - h - 8))
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    window = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1
    rle, _ = encode_window(window, x, y, HEIGHT, WIDTH)
    return rle, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=2_000, help="distinct mask pairs")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(args.distinct):
        state = rng.bit_generator.state
        a, ax = ellipse_rle(rng, 0)
        rng.bit_generator.state = state  # the same ellipse, moved 3 pixels right
        b, bx = ellipse_rle(rng, 3)
        pairs.append((a, b, ax, bx))
    con = duckdb.connect(config={"threads": 1})
    register_duckdb(con)
    con.execute("CREATE TABLE p (a VARCHAR, b VARCHAR, ax0 INT, bx0 INT)")
    con.executemany("INSERT INTO p VALUES (?, ?, ?, ?)", pairs)
    con.execute(
        f"CREATE TABLE t AS SELECT a, b, ax0, bx0, ax0 + 400 AS ax1, bx0 + 400 AS bx1, "
        f"{HEIGHT} AS h, {WIDTH} AS w FROM p, range({-(-args.rows // args.distinct)}) "
        f"LIMIT {args.rows}"
    )
    mean_len = con.execute("SELECT avg(length(a)) FROM t").fetchone()[0]  # type: ignore[index]
    print(f"{args.rows:,} rows, {WIDTH}x{HEIGHT} images, RLE strings of {mean_len:.0f} chars")
    for name, expr in QUERIES.items():
        seconds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            con.execute(f"SELECT {expr} FROM t").fetchall()
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        print(f"{name:20} {args.rows / median:>12,.0f} rows/s  (median of {args.repeat})")


if __name__ == "__main__":
    main()
