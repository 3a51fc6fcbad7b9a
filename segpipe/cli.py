"""The ``segpipe`` command line: a thin layer that builds configs and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("segpipe")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segpipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="segment a few generated images, print a SQL summary")
    demo.add_argument("--output", default="segpipe-demo-output", help="output folder")
    demo.add_argument("--images", type=int, default=6, help="how many images to generate")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        return demo_command(args.output, args.images)
    parser.error(f"unknown command {args.command}")
    return 2


def demo_command(output: str, count: int) -> int:
    """Core-only demo: generated images -> decode -> Mask R-CNN -> RLE rows -> Parquet -> SQL."""
    import duckdb

    from segpipe.config import DecodeConfig, ModelConfig
    from segpipe.samples import sample_files
    from segpipe.stages import Segment, load_batch, split_tables
    from segpipe.writer import IMAGES_DIR, INSTANCES_DIR, write_table

    print(
        "segpipe demo: no trained model ships yet and none can be downloaded here, so this "
        "demo runs Mask R-CNN with RANDOM weights (--weights none): the plumbing is real, the "
        "detections are meaningless."
    )
    import numpy as np

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as inputs:
        uris = []
        for name, data in sample_files(count):
            path = Path(inputs) / name
            path.write_bytes(data)
            uris.append(path.as_uri())
        uris.append((Path(inputs) / "broken.jpg").as_uri())
        (Path(inputs) / "broken.jpg").write_bytes(b"<html>404 not found</html>")

        model = ModelConfig(weights="none", min_size=320, max_size=512, max_detections=20)
        segment = Segment(model, run_id="demo")
        loaded = load_batch({"uri": np.array(uris, dtype=object)}, DecodeConfig())
        images, instances = split_tables(segment(loaded))
    for name, table in ((IMAGES_DIR, images), (INSTANCES_DIR, instances)):
        write_table(table, output, name, partition_by=["run_id"], file_stem="part-00000")
    elapsed = time.perf_counter() - started

    root = Path(output).resolve()
    con = duckdb.connect()
    con.sql(
        f"CREATE VIEW images AS SELECT * FROM read_parquet('{root}/images/**/*.parquet', "
        "hive_partitioning=true)"
    )
    con.sql(
        f"CREATE VIEW instances AS SELECT * FROM read_parquet('{root}/instances/**/*.parquet', "
        "hive_partitioning=true)"
    )
    print(f"\nwrote {root} in {elapsed:.1f} s\n")
    print("images by status:")
    con.sql("SELECT status, count(*) AS images FROM images GROUP BY status ORDER BY status").show()
    print("errors:")
    con.sql("SELECT uri, error_code, error FROM images WHERE status = 'error'").show()
    print("top labels (random weights: meaningless):")
    con.sql(
        "SELECT label, count(*) AS n, round(avg(score), 3) AS mean_score, "
        "sum(mask_area) AS mask_pixels FROM instances GROUP BY label ORDER BY n DESC LIMIT 5"
    ).show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
