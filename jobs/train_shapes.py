"""Train ``maskrcnn_tiny_fpn`` on the generated shapes dataset, on the CPU, from scratch.

    .venv/bin/python jobs/train_shapes.py --out segpipe/weights/shapes.pt

The defaults are the settings of the shipped checkpoint ``segpipe/weights/shapes.pt`` (see
README "The shapes model" for the time it took). Training is deterministic for a given
seed, torch build and thread count: every batch is generated from ``(seed, image index)``
and torch is seeded and restricted to deterministic algorithms.

The checkpoint is an ordinary segpipe checkpoint: ``{"model": state dict, "arch",
"categories", "transform": {"min_size", "max_size"}, "training": {...}}``, loadable with
``torch.load(weights_only=True)`` and by ``segpipe run --weights PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from segpipe.analytics.evaluation import CocoMetrics, detection_results, evaluate, format_metrics
from segpipe.config import ModelConfig
from segpipe.core.model import Segmenter
from segpipe.core.tiny import ARCH, maskrcnn_tiny_fpn
from segpipe.tools.shapes import (
    CATEGORIES,
    ShapesImage,
    coco_annotation_entries,
    coco_categories,
    coco_image_entry,
    generate,
    generate_image,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    threads: int = 2
    min_size: int = 256
    max_size: int = 448


def _targets(image: ShapesImage) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.from_numpy(image.pixels).permute(2, 0, 1).float().div_(255.0)
    masks, boxes, labels = [], [], []
    for shape in image.shapes:
        mask = torch.from_numpy(shape.mask)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        # Box edges in continuous pixel coordinates: pixel i spans [i, i + 1).
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
        masks.append(mask.to(torch.uint8))
        labels.append(CATEGORIES.index(shape.category) + 1)
    height, width = image.pixels.shape[:2]
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros((0, height, width), torch.uint8),
    }
    return pixels, target


def build(cfg: TrainConfig) -> torch.nn.Module:
    return maskrcnn_tiny_fpn(
        num_classes=len(CATEGORIES) + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        box_batch_size_per_image=128,
    )


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, log_every: int = 50) -> dict[str, Any]:
    """Train and return the checkpoint dict."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    model = build(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    started = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(cfg.steps):
        batch = [
            _targets(generate_image(cfg.seed, step * cfg.batch_size + j))
            for j in range(cfg.batch_size)
        ]
        images = [pixels for pixels, _ in batch]
        targets = [target for _, target in batch]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        for name, value in losses.items():
            running[name] = running.get(name, 0.0) + value.item()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            n = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            parts = " ".join(f"{k.removeprefix('loss_')}={v / n:.3f}" for k, v in running.items())
            elapsed = time.perf_counter() - started
            print(
                f"step {step + 1}/{cfg.steps} lr={scheduler.get_last_lr()[0]:.2e} {parts} "
                f"[{elapsed:.0f} s]",
                flush=True,
            )
            running = {}
    model.eval()
    return {
        "model": model.state_dict(),
        "arch": ARCH,
        "categories": ["__background__", *CATEGORIES],
        "transform": {"min_size": cfg.min_size, "max_size": cfg.max_size},
        # Settings only (no timings), so that the same settings give the same bytes.
        "training": asdict(cfg),
    }


def save(checkpoint: dict[str, Any], out: Path) -> str:
    """Write the checkpoint (atomically) and return its SHA-256."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    data = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return hashlib.sha256(data).hexdigest()


def evaluate_checkpoint(path: Path, seed: int, count: int) -> CocoMetrics:
    """COCO metrics of the checkpoint on ``count`` images of seed ``seed``, through the same
    model loading and mask encoding as ``segpipe run`` (without Ray, decoding or Parquet)."""
    segmenter = Segmenter(ModelConfig(weights=str(path), device="cpu"))
    images, annotations, results = [], [], []
    gt_categories = {name: i for i, name in enumerate(CATEGORIES, 1)}
    for image_id, image in enumerate(generate(seed, count), 1):
        images.append(coco_image_entry(image, image_id))
        annotations.extend(coco_annotation_entries(image, image_id, len(annotations) + 1))
        (detections,) = segmenter([image.pixels])
        results.extend(detection_results(detections, image_id, segmenter.categories, gt_categories))
    gt = {"images": images, "annotations": annotations, "categories": coco_categories()}
    return evaluate(gt, results)


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--eval-images", type=int, default=100, help="held-out images to evaluate on (0: none)"
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    print(f"training {ARCH} on shapes: {cfg}", flush=True)
    started = time.perf_counter()
    checkpoint = train(cfg, log_every=args.log_every)
    seconds = time.perf_counter() - started
    digest = save(checkpoint, args.out)
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, sha256 {digest}) after {seconds:.0f} s of training")
    if args.eval_images:
        held_out = cfg.seed + 1
        metrics = evaluate_checkpoint(args.out, held_out, args.eval_images)
        print(f"COCO metrics on {args.eval_images} held-out images (seed {held_out}):")
        print(format_metrics(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
