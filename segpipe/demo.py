"""``segpipe demo``: the whole job on one machine, against a real S3 API on loopback.

Generated images go into a bucket of a moto S3 server on 127.0.0.1 (started and stopped
here); the Ray Data job reads them from ``s3://`` and writes its tables back to ``s3://``; a
DuckDB summary is printed at the end. No trained model ships yet, so it runs Mask R-CNN with
random weights (``--weights none``): the plumbing is real, the detections are meaningless.
"""

from __future__ import annotations

import logging
import os

import fsspec

from segpipe.config import ModelConfig, RunConfig
from segpipe.pipeline import run
from segpipe.query import connect
from segpipe.s3local import moto_server
from segpipe.samples import sample_files

log = logging.getLogger(__name__)

BUCKET = "segpipe-demo"
# Credentials for the throwaway loopback server only; real runs use the provider chain.
_DEMO_ENV = {
    "AWS_ACCESS_KEY_ID": "segpipe-demo",
    "AWS_SECRET_ACCESS_KEY": "segpipe-demo",
    "AWS_DEFAULT_REGION": "us-east-1",
}

SUMMARY_QUERIES = (
    ("images by status", "SELECT status, count(*) AS images FROM images GROUP BY status"),
    ("errors", "SELECT uri, error_code, error FROM images WHERE status = 'error'"),
    (
        "objects per class (random weights: meaningless)",
        "SELECT label, count(*) AS objects, round(avg(score), 3) AS mean_score, "
        "round(avg(mask_area)) AS mean_mask_px FROM instances "
        "GROUP BY label ORDER BY objects DESC, label LIMIT 8",
    ),
)


def run_demo(images: int = 8) -> int:
    print(
        "segpipe demo: Mask R-CNN with RANDOM weights (--weights none), since no trained "
        "model ships yet and none can be downloaded here. The pipeline is real; the "
        "detections are meaningless."
    )
    if os.environ.pop("RAY_ADDRESS", None):
        print("segpipe demo: ignoring RAY_ADDRESS; the demo runs an embedded local Ray.")
    with moto_server() as endpoint:
        os.environ.update(_DEMO_ENV, AWS_ENDPOINT_URL=endpoint)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        for name, data in sample_files(images):
            fs.pipe_file(f"{BUCKET}/images/{name}", data)
        fs.pipe_file(f"{BUCKET}/images/corrupt.jpg", b"<html><body>404 Not Found</body></html>")
        print(
            f"segpipe demo: {images + 1} images (one corrupt) in s3://{BUCKET}/images/ "
            f"on the local S3 server at {endpoint}"
        )
        cfg = RunConfig(
            inputs=(f"s3://{BUCKET}/images/",),
            output=f"s3://{BUCKET}/output",
            run_id="demo",
            model=ModelConfig(weights="none", min_size=320, max_size=512, max_detections=20),
            batch_size=2,
        )
        summary = run(cfg)
        print("\n" + summary.describe() + "\n")
        con = connect(cfg.output)
        for title, sql in SUMMARY_QUERIES:
            print(title + ":")
            con.sql(sql).show(max_width=120)
        con.close()
    return 0
