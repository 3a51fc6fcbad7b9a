"""Photo-sized inputs: does decoding straight to the model's size cost quality, or time?

`python jobs/photo_quality.py --images 24 --scale 5 [--compare-1x] [--json out.json]`

Writes ``--images`` held-out shapes scenes (``--seed``, default 1; the shipped model was trained
on seed 0) at ``--scale`` times their usual size as JPEG (quality 92, like a camera's) with
their exact COCO annotations at that size (:mod:`segpipe.tools.shapes`: the same scene, shapes
scaled with the image, so the model sees what it was trained on once it resizes the image). It
runs the whole job on them with the shipped shapes model twice, in one embedded Ray runtime
after an unmeasured warm-up run: the default fast path (large JPEGs decoded straight to the
model's input size, rows in full-resolution coordinates) and ``--full-resolution`` decoding
(every pixel decoded, the model resizes), and scores both with pycocotools (box and mask AP,
AP@0.5) against the annotations. ``--compare-1x`` also runs the same scenes at scale 1 (JPEG,
fast path) and prints the wall time at ``--scale`` over the wall time at 1x.

Wall time is the run's own (``RunSummary.seconds``: checks, listing, actors and model load,
reading, decoding, the model, writing and committing), not counting Ray's start; the warm-up
run's time (2 small images) is printed as an estimate of the fixed start-up every run pays,
which dominates small ``--images`` on a small machine. The images
and outputs go to ``--out`` (default: a temporary folder, removed at the end); images already
written there for the same seed, scale and count are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.data import DataContext

from segpipe.analytics.evaluation import evaluate, predictions
from segpipe.analytics.query import connect
from segpipe.config import DecodeConfig, ModelConfig, RunConfig
from segpipe.job.pipeline import ray_runtime, run
from segpipe.tools.shapes import write_dataset

JPEG_QUALITY = 92
AP_TOLERANCE = 0.02  # fast path vs full decode, box and mask AP
WALL_RATIO_BOUND = 1.3  # wall time at --scale over wall time at 1x


@dataclass
class RunFigures:
    name: str
    scale: int
    full_resolution: bool
    images: int
    images_ok: int
    instances: int
    seconds: float
    images_per_s: float
    box_ap: float
    mask_ap: float
    box_ap50: float
    mask_ap50: float

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40, help="scenes (default: 40)")
    parser.add_argument("--scale", type=int, default=5, help="times the usual size (default: 5)")
    parser.add_argument("--seed", type=int, default=1, help="shapes seed (default: 1, held out)")
    parser.add_argument("--out", help="folder for images and outputs (default: a temp folder)")
    parser.add_argument("--json", help="write the figures here as JSON")
    parser.add_argument(
        "--compare-1x", action="store_true", help="also run the same scenes at scale 1"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up run")
    args = parser.parse_args()
    if args.images < 1 or args.scale < 1:
        parser.error("--images and --scale must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return measure(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="photo_quality_") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, root: Path) -> int:
    model = ModelConfig(weights="shapes", device=args.device)
    started = time.monotonic()
    big = dataset(root, args.seed, args.images, args.scale)
    small = dataset(root, args.seed, args.images, 1) if args.compare_1x else None
    print(f"images written in {time.monotonic() - started:.1f} s under {root}", flush=True)
    DataContext.get_current().enable_progress_bars = False
    figures: list[RunFigures] = []
    warmup_seconds = None
    with ray_runtime():
        if not args.no_warmup:
            warm = dataset(root, args.seed + 1000, 2, 1)
            warmup_seconds = round(
                job(root, "warmup", warm[0], model, DecodeConfig())[0].seconds, 2
            )
        runs = [(f"fast-x{args.scale}", big, False), (f"full-x{args.scale}", big, True)]
        if small is not None:
            runs.append(("fast-x1", small, False))
        for name, (folder, gt, scale), full in runs:
            decode = DecodeConfig(full_resolution=full)
            summary, metrics = job(root, name, folder, model, decode, gt)
            assert metrics is not None
            box, mask = metrics.stats["bbox"], metrics.stats["segm"]
            figures.append(
                RunFigures(
                    name=name,
                    scale=scale,
                    full_resolution=full,
                    images=summary.images,
                    images_ok=summary.images_ok,
                    instances=summary.instances,
                    seconds=round(summary.seconds, 2),
                    images_per_s=round(summary.images_per_s, 3),
                    box_ap=round(box["AP"], 4),
                    mask_ap=round(mask["AP"], 4),
                    box_ap50=round(box["AP50"], 4),
                    mask_ap50=round(mask["AP50"], 4),
                )
            )
            print(f"{name}: {summary.describe()}", flush=True)
    report = summarise(args, figures)
    report["warmup_seconds"] = warmup_seconds
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def dataset(root: Path, seed: int, count: int, scale: int) -> tuple[Path, dict[str, Any], int]:
    """The JPEG shapes dataset (folder, annotations, scale), reused if already written."""
    folder = root / f"images_s{seed}_x{scale}_n{count}"
    annotations = folder / "annotations.json"
    if annotations.exists():
        gt = json.loads(annotations.read_text())
    else:
        gt = write_dataset(str(folder), seed, count, scale=scale, fmt="jpeg", quality=JPEG_QUALITY)
    return folder, gt, scale


def job(
    root: Path,
    name: str,
    folder: Path,
    model: ModelConfig,
    decode: DecodeConfig,
    gt: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """One whole run of the job over ``folder`` into ``root/out-<name>``, and its COCO metrics
    against ``gt`` (None without ``gt``)."""
    cfg = RunConfig(
        output=str(root / f"out-{name}"),
        inputs=(str(folder),),
        extensions=(".jpg",),
        run_id=name,
        model=model,
        decode=decode,
        overwrite=True,
    )
    summary = run(cfg)
    if gt is None:
        return summary, None
    con = connect(cfg.output)
    found = predictions(con, gt, name, None)
    con.close()
    if found.images_matched != len(gt["images"]) or found.unknown_labels:
        raise RuntimeError(
            f"{name}: {found.images_matched} of {len(gt['images'])} images matched, "
            f"unknown labels {found.unknown_labels}"
        )
    return summary, evaluate(gt, found.results)


def summarise(args: argparse.Namespace, figures: list[RunFigures]) -> dict[str, Any]:
    by_name = {f.name: f for f in figures}
    fast, full = by_name[f"fast-x{args.scale}"], by_name[f"full-x{args.scale}"]
    difference = {
        key: round(getattr(fast, key) - getattr(full, key), 4)
        for key in ("box_ap", "mask_ap", "box_ap50", "mask_ap50")
    }
    report: dict[str, Any] = {
        "config": {
            "images": args.images,
            "scale": args.scale,
            "seed": args.seed,
            "jpeg_quality": JPEG_QUALITY,
            "device": args.device,
            "warmup": not args.no_warmup,
        },
        "runs": [f.as_json() for f in figures],
        "fast_minus_full": difference,
        "ap_within_tolerance": abs(difference["box_ap"]) <= AP_TOLERANCE
        and abs(difference["mask_ap"]) <= AP_TOLERANCE,
        "fast_speedup_over_full": round(full.seconds / fast.seconds, 3),
    }
    if "fast-x1" in by_name:
        ratio = fast.seconds / by_name["fast-x1"].seconds
        report["wall_ratio_scale_over_1x"] = round(ratio, 3)
        report["wall_ratio_within_bound"] = ratio <= WALL_RATIO_BOUND
    return report


def print_report(report: dict[str, Any]) -> None:
    head = (
        f"{'run':10} {'scale':>5} {'decode':>6} {'images':>6} {'wall s':>7} {'img/s':>6} "
        f"{'box AP':>7} {'mask AP':>7} {'box@.5':>7} {'mask@.5':>7}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in report["runs"]:
        print(
            f"{r['name']:10} {r['scale']:5d} {'full' if r['full_resolution'] else 'fast':>6} "
            f"{r['images_ok']:6d} {r['seconds']:7.1f} {r['images_per_s']:6.2f} "
            f"{r['box_ap']:7.3f} {r['mask_ap']:7.3f} {r['box_ap50']:7.3f} {r['mask_ap50']:7.3f}"
        )
    d = report["fast_minus_full"]
    verdict = "yes" if report["ap_within_tolerance"] else "NO"
    print(
        f"\nfast - full: box AP {d['box_ap']:+.4f}, mask AP {d['mask_ap']:+.4f}, box AP@0.5 "
        f"{d['box_ap50']:+.4f}, mask AP@0.5 {d['mask_ap50']:+.4f} (within {AP_TOLERANCE}: "
        f"{verdict}); full / fast wall time {report['fast_speedup_over_full']:.2f}x"
    )
    if report.get("warmup_seconds") is not None:
        print(
            f"warm-up run (2 images at 1x): {report['warmup_seconds']:.1f} s, about the fixed "
            "start-up of every run (actors, model load, planning), which the wall times include"
        )
    if "wall_ratio_scale_over_1x" in report:
        verdict = "yes" if report["wall_ratio_within_bound"] else "NO"
        print(
            f"wall time x{report['config']['scale']} / x1 (fast path): "
            f"{report['wall_ratio_scale_over_1x']:.2f} (at most {WALL_RATIO_BOUND}: {verdict})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
