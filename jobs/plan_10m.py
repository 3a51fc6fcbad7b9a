"""Figures behind infra/README.md's "Planning past one machine": `python jobs/plan_10m.py`.

Measures, on this machine, what can be measured without a cluster, and prints the
extrapolation to ``--images`` (default 10 million):

- listing: ``--keys`` empty objects under one prefix of a loopback S3 server (moto), listed
  with segpipe's own ``list_images`` (s3fs: ListObjectsV2 pages of at most 1000 keys, one
  after another); the driver memory that listing holds (tracemalloc) per key;
- manifest: a Parquet file of ``--manifest-rows`` URIs written with pyarrow, its size on
  disk and the time to read it back (the job's workers read it; the driver reads its schema);
- output files and object store pressure: computed from segpipe's defaults.

Needs the ``demo`` extra (moto). Took 91 s with the defaults on a 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import tracemalloc

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segpipe.job.inputs import list_images
from segpipe.tools.s3local import loopback_s3_env

LIST_PAGE = 1000  # keys per ListObjectsV2 response, the S3 maximum
MIB = 1024**2


def measure_listing(keys: int) -> dict[str, float]:
    """Seconds and traced bytes to list ``keys`` objects under one prefix."""
    with loopback_s3_env():
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
        fs.mkdir("plan")
        for start in range(0, keys, 5000):
            fs.pipe({f"plan/imgs/{i:010d}.jpg": b"" for i in range(start, min(keys, start + 5000))})
        s3 = fsspec.filesystem("s3")  # the instance list_images gets (fsspec caches them)
        fs.invalidate_cache()
        s3.invalidate_cache()
        started = time.perf_counter()
        found = sum(1 for _ in list_images(["s3://plan/imgs/"], (".jpg",)))
        seconds = time.perf_counter() - started
        # Again with allocations traced (slower, so not timed): what the listing holds
        # while it runs (peak) and after it (s3fs keeps listings in its directory cache).
        s3.invalidate_cache()
        tracemalloc.start()
        sum(1 for _ in list_images(["s3://plan/imgs/"], (".jpg",)))
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        s3.invalidate_cache()
    assert found == keys, (found, keys)
    return {"seconds": seconds, "held_bytes": held, "peak_bytes": peak}


def measure_manifest(rows: int, folder: str) -> dict[str, float]:
    """Write and read back a Parquet manifest of ``rows`` S3 URIs."""
    ids = pa.array(np.arange(rows, dtype=np.int64))
    names = pc.utf8_lpad(pc.cast(ids, pa.string()), 10, "0")
    uris = pc.binary_join_element_wise("s3://bucket/images/", names, ".jpg", "")
    table = pa.table({"uri": uris})
    path = os.path.join(folder, "manifest.parquet")
    started = time.perf_counter()
    pq.write_table(table, path)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    back = pq.read_table(path)
    read_s = time.perf_counter() - started
    assert back.num_rows == rows
    return {
        "write_seconds": write_s,
        "read_seconds": read_s,
        "file_bytes": os.path.getsize(path),
        "arrow_bytes": back.nbytes,
        "row_groups": pq.ParquetFile(path).num_row_groups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=20_000, help="objects to list")
    parser.add_argument("--manifest-rows", type=int, default=10_000_000)
    parser.add_argument("--images-per-file", type=int, default=5000)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--load-batch-size", type=int, default=16)
    args = parser.parse_args()
    n = args.images

    listing = measure_listing(args.keys)
    pages = math.ceil(args.keys / LIST_PAGE)
    per_page = listing["seconds"] / pages
    per_key = listing["peak_bytes"] / args.keys
    print(f"listing: {args.keys} keys in {pages} LIST pages took {listing['seconds']:.2f} s")
    print(
        f"  = {per_page * 1000:.0f} ms per page on loopback; driver peak {per_key:.0f} B/key, "
        f"{listing['held_bytes'] / args.keys:.0f} B/key still cached after it"
    )
    print(
        f"  {n} keys: {math.ceil(n / LIST_PAGE)} sequential pages = "
        f"{math.ceil(n / LIST_PAGE) * per_page / 60:.0f} min at this rate; "
        f"{n * per_key / 1024**3:.1f} GiB peak in the driver if they are under one prefix"
    )

    with tempfile.TemporaryDirectory() as tmp:
        manifest = measure_manifest(args.manifest_rows, tmp)
    scale = n / args.manifest_rows
    print(
        f"manifest: {args.manifest_rows} URIs -> {manifest['file_bytes'] / MIB:.0f} MiB Parquet "
        f"({manifest['row_groups']} row groups), written in {manifest['write_seconds']:.1f} s, "
        f"read in {manifest['read_seconds']:.2f} s, {manifest['arrow_bytes'] / MIB:.0f} MiB "
        f"in Arrow; scaled to {n}: {manifest['file_bytes'] * scale / MIB:.0f} MiB"
    )

    files = math.ceil(n / args.images_per_file)
    print(
        f"output: at most {files} files per table per partition value "
        f"(ceil({n} / {args.images_per_file})), {2 * files} for both tables"
    )

    image = args.height * args.width * 3
    block = image * args.load_batch_size
    print(
        f"object store: one decoded {args.width}x{args.height} RGB image = {image / 1e6:.2f} MB; "
        f"one decode block of {args.load_batch_size} = {block / MIB:.0f} MiB; "
        f"per model actor (2 tasks in flight, Ray Data's default) = {2 * block / MIB:.0f} MiB"
    )


if __name__ == "__main__":
    main()
