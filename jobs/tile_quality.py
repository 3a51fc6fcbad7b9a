"""Huge images: tiled inference against the whole-image path, in quality, time and memory.

`python jobs/tile_quality.py --scenes 6 --height 3072 --width 4096 --big 20000 --json t.json`

Writes ``--scenes`` scenes of ``--height`` x ``--width`` (:mod:`segpipe.tools.scenes`: shapes
at the sizes the shipped model was trained on, about 25 a megapixel, exact COCO ground truth;
PNG) and runs the whole job on them with the shipped shapes model, on an embedded Ray with
``--actors`` CPU model actors, after an unmeasured warm-up run:

- ``tiled``: ``--tile 256 --tile-overlap 128`` (the model's input size: tiles at native
  scale), every scene tiled;
- ``whole``: the same scenes as every image went before (shrunk to the model's 256-px short
  side, where the shapes are 4 to 10 pixels across);
- ``ordinary``: ``--ordinary`` held-out images of the shapes dataset (seed 1), whole, the
  model's own ground: the figure tiling is held against (the issue: tiled AP@0.5 at least
  0.9 of it).

Each is scored with pycocotools (box and mask AP, AP@0.5). With ``--big SIDE``, one more
scene of SIDE x SIDE pixels (JPEG) runs tiled with ``--big-tile`` tiles; its run gives the
time per megapixel at that size and the peak memory of the decode tasks, the model actors and
the driver, sampled every 0.2 s (a process's RSS without the object store's shared pages, as
``jobs/scale_check.py`` counts it; the object store apart).
Every run reports how much CPU each model actor spent: how the images' tiles spread over the
pool. Times are each run's own (``RunSummary``: from the run's checks to its last commit).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from ray.data import DataContext

from segpipe.analytics.evaluation import evaluate, predictions
from segpipe.analytics.query import connect
from segpipe.config import ModelConfig, RunConfig, TileConfig
from segpipe.job.pipeline import ray_runtime, run
from segpipe.tools.scale import private_rss, process_kind
from segpipe.tools.scenes import write_scenes
from segpipe.tools.shapes import write_dataset

SCENE_SEED = 3
HELD_OUT_SEED = 1
MIB = 1024**2


@dataclass
class Peaks:
    """Peak memory (MiB) by kind of process, and each model actor's CPU seconds."""

    largest: dict[str, float] = field(default_factory=dict)  # the largest process of a kind
    total: dict[str, float] = field(default_factory=dict)  # all processes of a kind together
    actor_cpu_s: dict[int, float] = field(default_factory=dict)


class Sampler:
    """Samples this process's descendants every ``interval`` seconds from a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peaks = Peaks()
        self.root = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        totals: dict[str, float] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                kind = process_kind(" ".join(proc.cmdline()), proc.pid, self.root.pid)
                rss = private_rss(proc) / MIB
                if kind == "model_actor":
                    cpu = proc.cpu_times()
                    self.peaks.actor_cpu_s[proc.pid] = cpu.user + cpu.system
            except (psutil.Error, OSError):
                continue
            totals[kind] = totals.get(kind, 0.0) + rss
            self.peaks.largest[kind] = max(self.peaks.largest.get(kind, 0.0), rss)
        for kind, mib in totals.items():
            self.peaks.total[kind] = max(self.peaks.total.get(kind, 0.0), mib)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--height", type=int, default=3072)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--ordinary", type=int, default=40, help="held-out shapes images")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--big", type=int, default=0, help="side of one huge scene; 0: none")
    parser.add_argument("--big-tile", type=int, default=512)
    parser.add_argument("--out", help="folder for images and outputs (default: a temp folder)")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return measure(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="tile_quality_") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, root: Path) -> int:
    started = time.monotonic()
    scenes = data(root / f"scenes_{args.scenes}_{args.width}x{args.height}", args, "scenes")
    ordinary = data(root / f"ordinary_{args.ordinary}", args, "ordinary")
    big = data(root / f"big_{args.big}", args, "big") if args.big else None
    print(f"images written in {time.monotonic() - started:.1f} s under {root}", flush=True)
    DataContext.get_current().enable_progress_bars = False
    tiled = TileConfig(tile=args.tile, tile_overlap=args.overlap, tile_above=1)
    report: dict[str, Any] = {"config": vars(args), "runs": {}}
    with ray_runtime():
        job(root, "warmup", ordinary[0], TileConfig(), args.actors, None, extensions=(".png",))
        runs = [
            ("tiled", scenes, tiled),
            ("whole", scenes, TileConfig()),
            ("ordinary", ordinary, TileConfig()),
        ]
        if big is not None:
            runs.append(("big", big, TileConfig(tile=args.big_tile, tile_overlap=args.overlap)))
        for name, (folder, gt), tiling in runs:
            report["runs"][name] = job(root, name, folder, tiling, args.actors, gt)
            print(f"{name}: {json.dumps(report['runs'][name])}", flush=True)
    summarise(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def data(folder: Path, args: argparse.Namespace, kind: str) -> tuple[Path, dict[str, Any]]:
    """A dataset folder and its annotations, written unless already there."""
    annotations = folder / "annotations.json"
    if annotations.exists():
        return folder, json.loads(annotations.read_text())
    if kind == "scenes":
        gt = write_scenes(str(folder), SCENE_SEED, args.scenes, args.height, args.width)
    elif kind == "ordinary":
        gt = write_dataset(str(folder), HELD_OUT_SEED, args.ordinary)
    else:
        gt = write_scenes(str(folder), SCENE_SEED + 1, 1, args.big, args.big, fmt="jpeg")
    return folder, gt


def job(
    root: Path,
    name: str,
    folder: Path,
    tiling: TileConfig,
    actors: int,
    gt: dict[str, Any] | None,
    extensions: tuple[str, ...] = (".png", ".jpg"),
) -> dict[str, Any]:
    """One whole run over ``folder``; its figures and, with ``gt``, its COCO metrics."""
    cfg = RunConfig(
        output=str(root / f"out-{name}"),
        inputs=(str(folder),),
        extensions=extensions,
        run_id=name,
        model=ModelConfig(weights="shapes", device="cpu"),
        tiles=tiling,
        min_actors=actors,
        max_actors=actors,
        torch_threads=1,
        overwrite=True,
    )
    with Sampler() as sampler:
        summary = run(cfg)
    megapixels = sum(e["width"] * e["height"] for e in gt["images"]) / 1e6 if gt else 0.0
    figures: dict[str, Any] = {
        "images": summary.images,
        "images_ok": summary.images_ok,
        "instances": summary.instances,
        "tiles": summary.tiles,
        "seconds": round(summary.seconds, 2),
        "seconds_per_image": round(summary.seconds / max(summary.images, 1), 3),
        "seconds_per_megapixel": round(summary.seconds / megapixels, 3) if megapixels else None,
        "peak_mib_largest": {k: round(v) for k, v in sampler.peaks.largest.items()},
        "peak_mib_total": {k: round(v) for k, v in sampler.peaks.total.items()},
        "model_actor_cpu_s": sorted(round(v, 1) for v in sampler.peaks.actor_cpu_s.values()),
    }
    if gt is not None:
        con = connect(cfg.output)
        found = predictions(con, gt, name, None)
        con.close()
        metrics = evaluate(gt, found.results)
        box, mask = metrics.stats["bbox"], metrics.stats["segm"]
        figures.update(
            box_ap=round(box["AP"], 4),
            mask_ap=round(mask["AP"], 4),
            box_ap50=round(box["AP50"], 4),
            mask_ap50=round(mask["AP50"], 4),
        )
    return figures


def summarise(report: dict[str, Any], args: argparse.Namespace) -> None:
    runs = report["runs"]
    ordinary, tiled, whole = runs["ordinary"], runs["tiled"], runs["whole"]
    report["tiled_over_ordinary_ap50"] = {
        kind: round(tiled[f"{kind}_ap50"] / ordinary[f"{kind}_ap50"], 3) for kind in ("box", "mask")
    }
    print(
        f"\nscenes {args.width}x{args.height}, AP@0.5 box / mask: tiled "
        f"{tiled['box_ap50']:.3f} / {tiled['mask_ap50']:.3f}, whole {whole['box_ap50']:.3f} / "
        f"{whole['mask_ap50']:.3f}; ordinary shapes images {ordinary['box_ap50']:.3f} / "
        f"{ordinary['mask_ap50']:.3f}; tiled / ordinary {report['tiled_over_ordinary_ap50']}"
    )
    print(
        f"time: tiled {tiled['seconds_per_megapixel']} s/MP ({tiled['tiles']} tiles), whole "
        f"{whole['seconds_per_image']} s/image, ordinary {ordinary['seconds_per_image']} s/image"
    )
    if "big" in runs:
        big = runs["big"]
        print(
            f"big {args.big}x{args.big}: {big['seconds']} s, {big['seconds_per_megapixel']} s/MP, "
            f"{big['tiles']} tiles, {big['instances']} instances; peak MiB (largest process): "
            f"{big['peak_mib_largest']}; model actors' CPU s {big['model_actor_cpu_s']}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
