"""How the bare model uses one GPU: where a batch's time goes, and what several processes
sharing the GPU (as several Ray actors per GPU would) get together.

The model is Mask R-CNN at random weights with ``score_threshold=0`` so that every image
gives ``--detections`` masks (as jobs/levers.py). Random weights make every one of the
1,000 proposals x 90 classes a box candidate, so box post-processing (NMS) is far heavier
than with trained weights at a real threshold; the profile shows its share apart.
``--one-class`` makes the random model behave like a trained one after its box head: the
classifier is set to give every proposal class 1 at score ~1 and the threshold is 0.05, so
NMS sees ~1,000 candidates of one class per image (as a trained model at a low threshold
does) and still keeps ``--detections``.

python jobs/gpu_share.py --device cuda --processes 1,2,4 --json gpu-share.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections.abc import Sequence
from typing import Any

import torch

from segpipe.config import ModelConfig
from segpipe.core.model import Segmenter, synchronize


def segmenter_for(args: argparse.Namespace) -> Segmenter:
    segmenter = Segmenter(model_config(args))
    if args.one_class:
        heads: Any = segmenter.model.roi_heads  # the predictor may sit in a precision wrapper
        (cls_score,) = [m for n, m in heads.named_modules() if n.endswith("cls_score")]
        with torch.no_grad():
            cls_score.weight.zero_()
            cls_score.bias.zero_()
            cls_score.bias[1] = 10.0
    return segmenter


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        weights="none",
        device=args.device,
        min_size=min(args.width, args.height),
        max_size=max(args.width, args.height),
        score_threshold=0.05 if args.one_class else 0.0,
        max_detections=args.detections,
        precision=args.precision,
        channels_last=args.channels_last,
    )


def worker(args: argparse.Namespace, barrier: Any, results: Any) -> None:
    import jobs.levers as levers
    from segpipe.tools.benchmark import detect_rate

    torch.manual_seed(0)
    segmenter = segmenter_for(args)
    images = levers.pixels(args.width, args.height, args.images)
    detect_rate(segmenter, images[: args.batch], args.batch)  # warm-up
    barrier.wait()
    started = time.perf_counter()
    rate, _ = detect_rate(segmenter, images, args.batch, min_seconds=args.seconds)
    results.put((rate, time.perf_counter() - started))


def shared(args: argparse.Namespace, processes: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(args, barrier, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {
        "processes": processes,
        "images_per_s_total": round(sum(r for r, _ in rates), 2),
        "images_per_s_each": round(sum(r for r, _ in rates) / processes, 2),
    }


def profile(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The top operators of one batch by device time (CUDA) and host time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import jobs.levers as levers
    from segpipe.core.model import output_frame

    torch.manual_seed(0)
    segmenter = segmenter_for(args)
    images = levers.pixels(args.width, args.height, args.batch)
    tensors = [segmenter.to_tensor(i) for i in images]
    sizes = [(int(i.shape[0]), int(i.shape[1])) for i in images]
    frames = [output_frame(t, s, s) for t, s in zip(tensors, sizes, strict=True)]
    for _ in range(2):
        segmenter.detect(tensors, sizes, frames)
    synchronize(segmenter.device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=activities) as prof:
        segmenter.detect(tensors, sizes, frames)
        synchronize(segmenter.device)
    events = prof.key_averages()
    rows = []
    det = segmenter.detect(tensors, sizes, frames)
    print("detections per image:", [len(d) for d in det])
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        rows.append(
            {
                "op": e.key,
                "calls": e.count,
                "self_cuda_ms": round(e.self_device_time_total / 1000, 2),
                "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
            }
        )
    print(events.table(sort_by="self_cuda_time_total", row_limit=15))
    print(events.table(sort_by="self_cpu_time_total", row_limit=10))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--one-class", action="store_true")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"config": vars(args), "profile": profile(args), "shared": []}
    for n in [int(p) for p in args.processes.split(",") if p]:
        figures["shared"].append(shared(args, n))
        print(figures["shared"][-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
