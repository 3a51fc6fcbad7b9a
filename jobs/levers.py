"""Measure the model's speed levers one at a time, on the device at hand (issue: performance).

Each lever is timed on the bare model (tensors already on the device, results copied to the
host), on the same generated images, against the same baseline in the same process:

- mask paste: torchvision's (every mask pasted into an image-sized canvas, thresholded and
  copied to the host) vs segpipe's mask windows (``Segmenter.detect``);
- precision: fp32 vs bf16 / fp16 autocast;
- channels-last convolutions; cuDNN autotuning (CUDA only);
- batch size;
- batch composition: landscape and portrait images interleaved vs ordered by aspect ratio
  (what ``load_batch`` does), with the share of padded pixels the model computes on;
- the encode stage (mask windows -> COCO RLE) on one CPU core, for the detections made.

.venv/bin/python jobs/levers.py --images 8 --json levers-cpu.json                # CPU
python jobs/levers.py --device cuda --width 1066 --height 800 --detections 100 \\
    --images 64 --batch-sizes 1,4,8,16 --json levers-gpu.json                     # one GPU
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segpipe.config import BenchConfig, ModelConfig
from segpipe.core.model import Segmenter, synchronize
from segpipe.job.stages import encode_rows, image_rows
from segpipe.schema import image_id
from segpipe.tools.benchmark import decoded, detect_rate, jpeg_images


def pixels(width: int, height: int, count: int) -> list[np.ndarray]:
    return decoded(list(jpeg_images(BenchConfig(width=width, height=height), count)))


def timed(segmenter: Segmenter, images: Sequence[np.ndarray], batch: int) -> float:
    """Images per second of ``segmenter.detect`` over ``images`` in batches of ``batch``."""
    return detect_rate(segmenter, images, batch)[0]


def timed_full_paste(segmenter: Segmenter, images: Sequence[np.ndarray], batch: int) -> float:
    """The same with torchvision's own forward: full-image masks, thresholded, to the host."""
    device, threshold = segmenter.device, segmenter.cfg.mask_threshold
    tensors = [segmenter.to_tensor(image) for image in images]
    batches = [tensors[k : k + batch] for k in range(0, len(tensors), batch)]

    def run(b: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            for out in segmenter.model(b):
                (out["masks"][:, 0] > threshold).cpu()
                out["boxes"].cpu()

    run(batches[0])
    synchronize(device)
    started = time.perf_counter()
    for b in batches:
        run(b)
    synchronize(device)
    return len(tensors) / (time.perf_counter() - started)


def mask_postprocess(segmenter: Segmenter, images: Sequence[np.ndarray]) -> dict[str, float]:
    """The masks' share alone, per image: torchvision's paste (image-sized canvases,
    thresholded, copied to the host) vs windows, on the same model outputs; and the bytes of
    mask pixels each copies off the device."""
    device, threshold = segmenter.device, segmenter.cfg.mask_threshold
    full_ms = window_ms = full_bytes = window_bytes = 0.0
    for image in images:
        tensor = segmenter.to_tensor(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        with torch.inference_mode():
            (out,) = segmenter._forward([tensor])
            synchronize(device)
            started = time.perf_counter()
            pasted = paste_masks_in_image(out["masks"], out["boxes"], size)
            host = (pasted[:, 0] > threshold).cpu().numpy()
            synchronize(device)
            full_ms += 1000 * (time.perf_counter() - started)
            full_bytes += host.nbytes
            started = time.perf_counter()
            (det,) = segmenter._detections([out], [size])
            synchronize(device)
            window_ms += 1000 * (time.perf_counter() - started)
            window_bytes += sum(w.nbytes for w in det.masks)
    n = len(images)
    return {
        "full_paste_ms_per_image": round(full_ms / n, 2),
        "windows_ms_per_image": round(window_ms / n, 2),
        "full_paste_mib_per_image": round(full_bytes / n / 2**20, 2),
        "windows_mib_per_image": round(window_bytes / n / 2**20, 3),
    }


def padded_share(segmenter: Segmenter, images: Sequence[np.ndarray], batch: int) -> float:
    """Share of the pixels the backbone computes on that are batch padding."""
    transform: Any = segmenter.model.transform
    real = padded = 0
    for k in range(0, len(images), batch):
        tensors = [torch.zeros(3, i.shape[0], i.shape[1]) for i in images[k : k + batch]]
        with torch.inference_mode():
            batched, _ = transform(tensors)
        real += sum(h * w for h, w in batched.image_sizes)
        padded += batched.tensors.shape[0] * batched.tensors.shape[2] * batched.tensors.shape[3]
    return 1 - real / padded


def encode_rate(segmenter: Segmenter, images: Sequence[np.ndarray]) -> float:
    """Images per second of the encode stage (windows -> RLE rows), one CPU core."""
    detections = segmenter(list(images))
    uris = [f"s3://bench/{k}.jpg" for k in range(len(images))]
    batch = {
        "uri": np.array(uris, dtype=object),
        "image_id": np.array([image_id(u) for u in uris], dtype=object),
        "width": np.array([i.shape[1] for i in images], dtype=np.int32),
        "height": np.array([i.shape[0] for i in images], dtype=np.int32),
        "error_code": np.array([""] * len(images), dtype=object),
        "error": np.array([""] * len(images), dtype=object),
    }
    rows = image_rows(batch, "levers", dict(enumerate(detections)), segmenter.categories)
    started = time.perf_counter()
    encode_rows(rows)
    return len(images) / (time.perf_counter() - started)


LEVERS = ("paste", "precision", "channels_last", "cudnn", "batch", "order", "encode")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="maskrcnn_resnet50_fpn")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--detections", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=0, help="default: 1 on CPU, 8 on CUDA")
    parser.add_argument("--batch-sizes", default="", help="comma-separated sizes to sweep")
    parser.add_argument(
        "--only", default=",".join(LEVERS), help=f"comma-separated, from {','.join(LEVERS)}"
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    base = ModelConfig(
        arch=args.arch,
        weights="none",
        device=args.device,
        min_size=min(args.width, args.height),
        max_size=max(args.width, args.height),
        score_threshold=0.0,
        max_detections=args.detections,
    )
    torch.manual_seed(0)
    images = pixels(args.width, args.height, args.images)
    figures: dict[str, Any] = {"config": vars(args)}
    results: dict[str, float] = {}
    built: dict[tuple[Any, ...], Segmenter] = {}

    def segmenter(**changes: Any) -> Segmenter:
        cfg = replace(base, **changes)
        key = tuple(sorted(changes.items()))
        if key not in built:
            built.clear()  # one model on the device at a time
            built[key] = Segmenter(cfg)
        return built[key]

    fp32 = segmenter()
    cuda = fp32.device.type == "cuda"
    batch = args.batch or (8 if cuda else 1)
    figures["device"] = (
        torch.cuda.get_device_name(fp32.device)
        if cuda
        else (f"cpu ({torch.get_num_threads()} threads)")
    )

    def measure(name: str, fn: Callable[..., float], *args: Any) -> None:
        results[name] = round(fn(*args), 3)
        print(f"{name:<44} {results[name]:9.2f}", flush=True)

    print(
        f"device {figures['device']}, {args.images} images {args.width}x{args.height}, "
        f"{args.detections} detections each, batch {batch}; images/s:"
    )
    only = set(args.only.split(","))
    if "paste" in only:
        figures["mask_postprocess"] = mask_postprocess(fp32, images)
        print("mask post-processing alone:", figures["mask_postprocess"])
        measure("paste: torchvision full-image masks", timed_full_paste, fp32, images, batch)
    measure("paste: mask windows (segpipe)", timed, fp32, images, batch)
    for precision in (("bf16", "fp16") if cuda else ("bf16",)) if "precision" in only else ():
        seg = segmenter(precision=precision)
        measure(f"precision: {precision} autocast", timed, seg, images, batch)
    best = max(
        ("fp32", "bf16", "fp16"),
        key=lambda p: results.get(
            "paste: mask windows (segpipe)" if p == "fp32" else f"precision: {p} autocast", 0.0
        ),
    )
    if "channels_last" in only:
        seg = segmenter(precision=best, channels_last=True)
        measure(f"channels-last ({best})", timed, seg, images, batch)
    if cuda and "cudnn" in only:
        seg = segmenter(precision=best, cudnn_benchmark=True)
        measure(f"cudnn benchmark ({best})", timed, seg, images, batch)
    seg = segmenter(precision=best)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()] if "batch" in only else []
    for size in sizes:
        measure(f"batch {size} ({best})", timed, seg, images, size)
    if "order" in only:
        # Landscape and portrait alternating, as a listing of mixed photos gives them, vs the
        # same images ordered by aspect ratio (load_batch's order).
        mixed = [
            i if k % 2 == 0 else np.ascontiguousarray(i.transpose(1, 0, 2))
            for k, i in enumerate(images)
        ]
        ordered = sorted(mixed, key=lambda i: i.shape[1] / i.shape[0])
        size = max(2, batch)
        figures["padded_share_mixed"] = round(padded_share(seg, mixed, size), 3)
        figures["padded_share_ordered"] = round(padded_share(seg, ordered, size), 3)
        measure(f"mixed orientations, batch {size}", timed, seg, mixed, size)
        measure(f"ordered by aspect ratio, batch {size}", timed, seg, ordered, size)
        print(
            f"padded pixels: {figures['padded_share_mixed']:.0%} mixed, "
            f"{figures['padded_share_ordered']:.0%} ordered"
        )
    if "encode" in only:
        measure("encode stage, one CPU core", encode_rate, seg, images)
    figures["images_per_s"] = results
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
