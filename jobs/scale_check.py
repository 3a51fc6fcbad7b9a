"""The job at 100,000 images (issue 16's proof): `python jobs/scale_check.py --json scale.json`.

Generates ``--images`` small JPEGs (a few hundred distinct encodings under different keys),
PUTs them into a loopback S3 server (moto), runs the real job on them in a child process
(embedded Ray, the shipped tiny shapes model at a small input size, so that the pipeline is
what is measured), then the same job again, SIGKILLed once ``--kill-at`` of the images are
committed and finished with ``--resume``, then the job's stage functions in one process.

It prints, and writes with ``--json``: images/s per tenth of the run; the peak RSS of the
driver, of all Ray workers together and of the largest one at each tenth (flat: within
10 % from the first tenth to the end); the object store's peak; files per table against
ceil(images / images_per_file); CPU per image (stages on one core, the run's processes) and
Ray's overhead; the resume figures and the start-up timeline. See segpipe/tools/scale.py.

    .venv/bin/python jobs/scale_check.py    # 100,000 images: 1.5-2 h on a quiet 2-core machine
    .venv/bin/python jobs/scale_check.py --images 2000 --images-per-file 100 --json small.json
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

from segpipe.tools.scale import ScaleConfig, StoreProbe, describe, load_result, run_check


def store_probe() -> StoreProbe:
    """The object store's use, asked of the child's raylet over gRPC. This process never
    joins the cluster: it asks the GCS once for the raylet's address and lets go of it (a
    GCS client that outlives its cluster ends the whole process), then only calls the
    raylet, which may fail but never stops this process. Ray's internal API: segpipe itself
    only reaches Ray through segpipe.job.pipeline."""
    import os

    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    raylets: dict[str, tuple[str, int]] = {}

    def use_token() -> None:
        """The child's Ray uses token authentication (Ray's default for a local cluster),
        with the token in ~/.ray/auth_token, which the child's first Ray start on a fresh
        machine creates: turn it on here once the child is up, for the GCS and raylet
        clients, without passing the setting on to the children started later."""
        had = "RAY_AUTH_MODE" in os.environ
        quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            quiet.setLevel(level)
        if not had:
            os.environ.pop("RAY_AUTH_MODE", None)

    def raylet(gcs_address: str) -> tuple[str, int]:
        use_token()
        state = get_state_from_address(gcs_address)
        try:
            nodes = [n for n in state.node_table() if n["Alive"]]
        finally:
            state.disconnect()
        if not nodes:
            raise RuntimeError("no raylet is up yet")
        return str(nodes[0]["NodeManagerAddress"]), int(nodes[0]["NodeManagerPort"])

    def probe(gcs_address: str) -> dict[str, float]:
        if gcs_address not in raylets:
            raylets[gcs_address] = raylet(gcs_address)
        host, port = raylets[gcs_address]
        reply = get_memory_info_reply(None, host, port, timeout_seconds=5)
        stats = reply.store_stats
        return {
            name: float(getattr(stats, name))
            for name in (
                "object_store_bytes_used",
                "object_store_bytes_primary_copy",
                "object_store_bytes_avail",
                "object_store_bytes_fallback",
                "spilled_bytes_total",
                "num_local_objects",
            )
        }

    return probe


def main() -> None:
    d = ScaleConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--images-per-file", type=int, default=d.images_per_file)
    p.add_argument("--distinct", type=int, default=d.distinct, help="distinct encodings")
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--min-size", type=int, default=d.min_size, help="the model's input size")
    p.add_argument("--max-size", type=int, default=d.max_size)
    p.add_argument("--upload-threads", type=int, default=d.upload_threads)
    p.add_argument("--poll", type=float, default=d.poll_s, help="seconds between commit polls")
    p.add_argument("--sample", type=float, default=d.sample_s, help="seconds between samples")
    p.add_argument(
        "--kill-at",
        type=float,
        default=d.kill_at,
        help="kill the second run at this fraction committed, then resume it; 0 skips it",
    )
    p.add_argument(
        "--kill-by",
        choices=("committed", "model"),
        default=d.kill_by,
        help="what --kill-at counts: images committed, or images out of the model",
    )
    p.add_argument("--stage-images", type=int, default=d.stage_images)
    p.add_argument("--no-stages", action="store_true", help="skip the one-core stage costs")
    p.add_argument("--no-store", action="store_true", help="don't sample the object store")
    p.add_argument("--log-dir", help="where the runs' logs go (default: a new temp folder)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--report", metavar="JSON", help="print the summary of a saved run; no run")
    args = p.parse_args()
    if args.report:
        print(describe(load_result(json.loads(Path(args.report).read_text()))))
        return
    cfg = ScaleConfig(
        images=args.images,
        images_per_file=args.images_per_file,
        distinct=args.distinct,
        width=args.width,
        height=args.height,
        min_size=args.min_size,
        max_size=args.max_size,
        upload_threads=args.upload_threads,
        poll_s=args.poll,
        sample_s=args.sample,
        kill_at=args.kill_at,
        kill_by=args.kill_by,
        stage_images=args.stage_images,
    )
    if cfg.images / cfg.images_per_file < 10:
        print(
            f"scale check: note: {cfg.images} images in units of {cfg.images_per_file} "
            "commit fewer than ten times; the rate per tenth needs smaller --images-per-file"
        )
    # On SIGTERM, unwind (stop the run's processes and the S3 server) as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="scale-check-"))
    print(f"scale check: logs in {log_dir}", flush=True)
    result = run_check(
        cfg, log_dir, None if args.no_store else store_probe(), stages_too=not args.no_stages
    )
    print(describe(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_json(), indent=1))
        print(f"scale check: figures in {args.json}")


if __name__ == "__main__":
    main()
