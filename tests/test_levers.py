"""The model's speed levers (precision, channels-last, cuDNN autotuning) keep its results.

On the CPU these check correctness only; their speed is measured by ``jobs/levers.py``
(BENCHMARKS.md). The shipped shapes model scores the same COCO AP on held-out images under
each lever, and boxes stay float32 coordinates under reduced-precision autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segpipe.analytics.evaluation import detection_results, evaluate
from segpipe.analytics.query import connect
from segpipe.cli import build_parser, main, run_config
from segpipe.config import ModelConfig
from segpipe.core.decode import DecodedImage, decode_image
from segpipe.core.model import Segmenter
from segpipe.job.record import read_record
from segpipe.tools.shapes import (
    CATEGORIES,
    coco_annotation_entries,
    coco_categories,
    coco_image_entry,
    generate,
)

IMAGES = 16


def scored(segmenter: Segmenter) -> tuple[dict[str, dict[str, float]], list[np.ndarray]]:
    images, annotations, results, boxes = [], [], [], []
    gt_categories = {name: i for i, name in enumerate(CATEGORIES, 1)}
    for image_id, image in enumerate(generate(1, IMAGES), 1):
        images.append(coco_image_entry(image, image_id))
        annotations.extend(coco_annotation_entries(image, image_id, len(annotations) + 1))
        (det,) = segmenter([image.pixels])
        boxes.append(det.boxes)
        results.extend(detection_results(det, image_id, segmenter.categories, gt_categories))
    gt = {"images": images, "annotations": annotations, "categories": coco_categories()}
    return evaluate(gt, results).stats, boxes


@pytest.fixture(scope="module")
def fp32() -> tuple[dict[str, dict[str, float]], list[np.ndarray]]:
    return scored(Segmenter(ModelConfig(weights="shapes", device="cpu")))


@pytest.mark.parametrize(
    "lever",
    [{"precision": "bf16"}, {"channels_last": True}, {"precision": "bf16", "channels_last": True}],
    ids=["bf16", "channels-last", "bf16-channels-last"],
)
def test_levers_keep_coco_ap(lever: dict[str, Any], fp32: Any) -> None:
    base_stats, base_boxes = fp32
    stats, boxes = scored(Segmenter(ModelConfig(weights="shapes", device="cpu", **lever)))
    for kind in ("bbox", "segm"):
        assert base_stats[kind]["AP"] > 0.5
        assert abs(stats[kind]["AP"] - base_stats[kind]["AP"]) <= 0.02, (kind, stats, base_stats)
    # The strongest detection of each image is where it was, to a fraction of a pixel.
    moved = [np.abs(b[0] - a[0]).max() for a, b in zip(base_boxes, boxes, strict=True)]
    assert np.median(moved) < 0.5, moved
    if lever.get("precision") == "bf16":
        heads = Segmenter(ModelConfig(weights="shapes", device="cpu", **lever)).model
        assert heads.roi_heads.box_predictor.inner.bbox_pred.weight.dtype == torch.float32
        # Computed in float32: most coordinates are not bf16 numbers (8 significant bits).
        every = np.concatenate([b.reshape(-1) for b in boxes])
        every = every[every > 64]
        as_bf16 = torch.from_numpy(every).to(torch.bfloat16).float().numpy()
        assert (as_bf16 != every).mean() > 0.9


def test_lever_flags_reach_the_model_config() -> None:
    args = ["run", "--input", "/in", "--output", "/out", "--precision", "bf16", "--channels-last"]
    cfg = run_config(build_parser().parse_args(args))
    assert (cfg.model.precision, cfg.model.channels_last, cfg.model.cudnn_benchmark) == (
        "bf16",
        True,
        False,
    )
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        ModelConfig(precision="fp8")
    # fp16 autocast on a CPU runs many times slower than bf16: refused, on the driver when
    # the device is named, in the actor when auto picks the CPU.
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        ModelConfig(precision="fp16", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 is for GPUs"):
            Segmenter(ModelConfig(weights="shapes", precision="fp16", device="auto"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_levers_on_cuda() -> None:
    image = next(iter(generate(1, 1))).pixels
    base = Segmenter(ModelConfig(weights="shapes", device="cuda"))([image])[0]
    for lever in ({"precision": "bf16"}, {"precision": "fp16", "cudnn_benchmark": True}):
        (det,) = Segmenter(ModelConfig(weights="shapes", device="cuda", **lever))([image])
        assert len(det) > 0 and np.abs(det.boxes[0] - base.boxes[0]).max() < 1.0


def test_levers_reach_the_actors_and_the_record(ray_local: None, tmp_path: Path) -> None:
    """A run with --precision bf16 --channels-last: the actors use the levers (their rows are
    the core's under the same levers, not fp32's), and the run record says so."""
    shapes = list(generate(1, 4))
    for image in shapes:
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / image.file_name).write_bytes(image.png())
    output = str(tmp_path / "out")
    args = ["run", "--input", str(tmp_path / "in"), "--output", output, "--run-id", "levers",
            "--weights", "shapes", "--device", "cpu", "--precision", "bf16",
            "--channels-last", "--batch-size", "1"]  # fmt: skip
    assert main(args) == 0
    record = read_record(output, "levers")
    assert (record["config"]["model"]["precision"], record["config"]["model"]["channels_last"]) == (
        "bf16",
        True,
    )
    con = connect(output)
    rows = con.sql("SELECT uri, instance_id, score FROM instances ORDER BY uri, instance_id")
    got = {(uri, rank): score for uri, rank, score in rows.fetchall()}
    con.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor (one CPU)
    try:
        lever = Segmenter(ModelConfig(weights="shapes", device="cpu", precision="bf16",
                                      channels_last=True))  # fmt: skip
        fp32 = Segmenter(ModelConfig(weights="shapes", device="cpu"))
        expected, plain = {}, {}
        for image in shapes:
            uri = (tmp_path / "in" / image.file_name).as_uri()
            # As the job decodes it: at the model's scale (256/448), sized in full.
            seen = decode_image(image.png(), fit=(256, 448))
            assert isinstance(seen, DecodedImage)
            for table, segmenter in ((expected, lever), (plain, fp32)):
                (det,) = segmenter([seen.pixels], [(seen.height, seen.width)])
                order = np.argsort(-det.scores, kind="stable")
                table.update({(uri, r): float(det.scores[k]) for r, k in enumerate(order)})
    finally:
        torch.set_num_threads(threads)
    assert len(got) == len(expected) > 0
    assert max(abs(got[k] - expected[k]) for k in expected) < 1e-3
    assert got != plain  # the levers changed the numbers: they were on in the actors
