"""`segpipe bench` runs all three measurements and writes the JSON the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from segpipe.config import BenchConfig
from segpipe.tools.benchmark import bench_non_model, fixed_detections, jpeg_images
from tests.conftest import REPO, run_isolated
from tests.masks import full_masks


def run_job(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``jobs/<script>`` in its own process; it must succeed."""
    return run_isolated([sys.executable, str(REPO / "jobs" / script), *args])


def test_fixed_detections_and_non_model_stages() -> None:
    cfg = BenchConfig(width=64, height=48, detections=7, images=3)
    det = fixed_detections(cfg)
    assert full_masks(det).shape == (7, 48, 64) and len(det) == 7
    for mask, box in zip(full_masks(det), det.boxes, strict=True):
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
    stages = bench_non_model(cfg, list(jpeg_images(cfg, 3)))
    assert set(stages) == {"decode", "encode", "write"} and all(v > 0 for v in stages.values())


def test_bench_command_end_to_end(tmp_path: Path) -> None:
    """A tiny configuration, in its own process."""
    out = tmp_path / "bench.json"
    args = ["--arch", "maskrcnn_tiny_fpn", "--width", "96", "--height", "64", "--images", "4",
            "--scale", "2", "--detections", "3", "--device", "cpu", "--bare-seconds", "1",
            "--json", str(out)]  # fmt: skip
    result = run_job("benchmark.py", args)
    figures = json.loads(out.read_text())
    for key in ("bare_images_per_s", "pipeline_images_per_s", "efficiency", "peak_rss_mib"):
        assert figures[key] > 0, key
    assert figures["device"].startswith("cpu")
    assert [p["images"] for p in figures["pipeline"]] == [4, 8]
    assert figures["efficiency"] == figures["pipeline_images_per_s"] / figures["bare_images_per_s"]
    assert "steady state" in result.stdout and "non-model stages" in result.stdout


def test_levers_script_measures_each_lever(tmp_path: Path) -> None:
    """jobs/levers.py on a tiny configuration: every lever gets a figure, and ordering by
    aspect ratio removes the padding that mixed orientations cause."""
    out = tmp_path / "levers.json"
    args = ["--arch", "maskrcnn_tiny_fpn", "--width", "96", "--height", "64", "--images", "4",
            "--detections", "3", "--device", "cpu", "--batch-sizes", "2"]  # fmt: skip
    run_job("levers.py", [*args, "--json", str(out)])
    figures = json.loads(out.read_text())
    names = set(figures["images_per_s"])
    assert {"paste: torchvision full-image masks", "paste: mask windows (segpipe)"} <= names
    assert {"precision: bf16 autocast", "encode stage, one CPU core"} <= names
    assert any(name.startswith("batch 2 (") for name in names)
    assert all(v > 0 for v in figures["images_per_s"].values())
    assert figures["padded_share_mixed"] > 0.2 and figures["padded_share_ordered"] == 0


def test_non_model_stages_hand_on_the_model_input() -> None:
    """Decoded at the model's scale, a decode task hands on the model's input (3 x H x W at
    the model's size), less than the full image; with full_resolution, the full image."""
    from segpipe.core.decode import model_input_size
    from segpipe.tools.benchmark import non_model_stages

    cfg = BenchConfig(width=1200, height=900, detections=3, images=2)
    files = list(jpeg_images(cfg, 2))
    fit = (300, 500)
    h, w = model_input_size(900, 1200, *fit)
    full = 3 * 1200 * 900
    fast = non_model_stages(cfg, files, fit)
    assert fast.decoded_size == (h, w) and (h, w) == (300, 400)
    assert fast.handed_bytes_per_image == 3 * h * w < full
    assert fast.full_resolution_bytes_per_image == full
    assert set(fast.ms_per_image) == {"decode", "encode", "write"}
    slow = non_model_stages(replace(cfg, full_resolution=True), files, fit)
    assert slow.decoded_size == (900, 1200)
    assert slow.handed_bytes_per_image == slow.full_resolution_bytes_per_image == full


def test_bench_model_runs_at_the_weights_sizes_without_enlarging() -> None:
    """The bench's model: the weights' 800/1333, capped at the image's sides."""
    from segpipe.tools.benchmark import decode_fit, model_config, model_sizes

    assert model_sizes(BenchConfig()) == (480, 640)  # 640x480: run as it is
    photo = BenchConfig(width=4000, height=3000)
    assert model_sizes(photo) == (800, 1333) == decode_fit(photo)
    assert (model_config(photo).min_size, model_config(photo).max_size) == (800, 1333)
    assert decode_fit(BenchConfig(width=4000, height=3000, full_resolution=True)) is None
