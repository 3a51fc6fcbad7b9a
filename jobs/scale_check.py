"""File counts and driver memory as the input grows: `python jobs/scale_check.py 200 800`.

For each N it generates N small images, runs the whole job on an embedded Ray with random
weights (the model's speed is not the point here) and `--images-per-file 50`, and prints the
number of Parquet files per table against the bound ceil(N / 50) and the driver's peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
from pathlib import Path

import ray
from ray.data import DataContext

from segpipe.config import ModelConfig, RunConfig
from segpipe.job.pipeline import run
from segpipe.tools.samples import sample_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sizes", nargs="+", type=int, help="numbers of images to try")
    parser.add_argument("--images-per-file", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(include_dashboard=False)
    DataContext.get_current().enable_progress_bars = False
    model = ModelConfig(weights="none", min_size=64, max_size=96, max_detections=2)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"in{n}"
            folder.mkdir()
            for i in range(n):
                sample_image(i, (96, 64)).save(folder / f"{i:07d}.png")
            cfg = RunConfig(
                output=f"{tmp}/out{n}",
                inputs=(str(folder),),
                images_per_file=args.images_per_file,
                model=model,
            )
            summary = run(cfg)
            files = {
                table: len(list(Path(cfg.output).glob(f"{table}/**/*.parquet")))
                for table in ("images", "instances")
            }
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"N={n}: {summary.images} images rows, files per table {files} "
                f"(bound {-(-n // args.images_per_file)}), {summary.images_per_s:.2f} images/s, "
                f"driver peak RSS {peak:.0f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
