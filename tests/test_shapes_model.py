"""The shipped shapes model against the generator's ground truth, through the whole job.

Held-out images (seed 1; the model was trained on seed 0) are written as PNG files, run
through ``segpipe run --weights shapes`` on an embedded Ray, read back from Parquet with
DuckDB and scored with pycocotools, and one image is checked shape by shape.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe.analytics.evaluation import (
    detection_results,
    evaluate,
    format_metrics,
    predictions,
)
from segpipe.analytics.query import connect
from segpipe.cli import main
from segpipe.config import ModelConfig, RunConfig
from segpipe.core.decode import DecodedImage, decode_image
from segpipe.core.encode import decode_mask
from segpipe.core.model import Segmenter
from segpipe.core.tiny import ARCH
from segpipe.core.weights import WeightsError, build_model, fingerprint_weights
from segpipe.job.record import read_record
from segpipe.job.runs import resolved
from segpipe.tools.shapes import (
    CATEGORIES,
    coco_annotation_entries,
    coco_categories,
    coco_image_entry,
    generate,
    generate_image,
    write_dataset,
)
from tests.masks import full_masks

HELD_OUT_SEED = 1
HELD_OUT_IMAGES = 40
CHECKPOINT = Path(__file__).parents[1] / "segpipe" / "weights" / "shapes.pt"
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("shapes")
    gt = write_dataset(str(root / "images"), seed=HELD_OUT_SEED, count=HELD_OUT_IMAGES)
    output = root / "out"
    args = ["run", "--input", str(root / "images"), "--output", str(output)]
    assert main([*args, "--weights", "shapes", "--run-id", "held-out", "--device", "cpu"]) == 0
    return {"gt": gt, "output": str(output), "images": root / "images"}


def test_held_out_coco_ap(held_out_run: dict[str, Any]) -> None:
    gt = held_out_run["gt"]
    con = connect(held_out_run["output"])
    statuses = con.execute("SELECT status, count(*) FROM images GROUP BY ALL").fetchall()
    assert statuses == [("ok", HELD_OUT_IMAGES)]
    found = predictions(con, gt, run_id="held-out")
    con.close()
    assert found.images_matched == HELD_OUT_IMAGES and found.images_unmatched == 0
    assert not found.unknown_labels
    metrics = evaluate(gt, found.results)
    print("\n" + format_metrics(metrics))
    assert metrics.stats["segm"]["AP50"] >= 0.7
    assert metrics.stats["bbox"]["AP50"] >= 0.7


def test_one_image_by_hand(held_out_run: dict[str, Any]) -> None:
    """Image 0 of the held-out seed: every shape found, right class, mask IoU >= 0.8."""
    image = generate_image(HELD_OUT_SEED, 0)
    assert len(image.shapes) >= 3, "pick an image with several shapes"
    uri = (held_out_run["images"] / image.file_name).as_uri()
    con = connect(held_out_run["output"])
    rows = con.execute(
        "SELECT label, score, mask_rle, image_height, image_width FROM instances "
        "WHERE uri = ? AND score >= 0.5 ORDER BY instance_id",
        [uri],
    ).fetchall()
    con.close()
    height, width = image.pixels.shape[:2]
    detections = [(label, decode_mask(rle, h, w).astype(bool)) for label, _, rle, h, w in rows]
    assert all(m.shape == (height, width) for _, m in detections)
    for shape in image.shapes:
        ious = [_iou(shape.mask, mask) for _, mask in detections]
        best = int(np.argmax(ious))
        assert detections[best][0] == shape.category, (shape.category, detections[best][0])
        assert ious[best] >= 0.8, f"{shape.category}: IoU {ious[best]:.3f}"
    # ... and nothing confident that is not there.
    assert len(detections) == len(image.shapes)


def test_shapes_weights_select_arch_categories_and_sizes() -> None:
    info = fingerprint_weights(ModelConfig(weights="shapes"))
    assert info["arch"] == ARCH and info["name"] == "shapes"
    assert (info["min_size"], info["max_size"]) == (256, 448)
    _, built = build_model(ModelConfig(weights="shapes"))
    assert built.categories == ("__background__", *CATEGORIES)
    assert built.sha256 == info["sha256"]
    with pytest.raises(WeightsError, match="saved for arch 'maskrcnn_tiny_fpn'"):
        fingerprint_weights(ModelConfig(arch="maskrcnn_resnet50_fpn", weights="shapes"))
    with pytest.raises(WeightsError, match="has no torchvision weights"):
        fingerprint_weights(ModelConfig(arch=ARCH, weights="DEFAULT"))


def test_the_name_shapes_wins_over_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset folder called ``shapes`` in the working directory must not shadow the
    shipped weights (``./shapes`` names the folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    cfg = RunConfig(
        output=str(tmp_path / "out"), inputs=("shapes",), model=ModelConfig(weights="shapes")
    )
    assert resolved(cfg).model.weights == "shapes"
    assert fingerprint_weights(resolved(cfg).model)["arch"] == ARCH


def test_shipped_checkpoint_is_small_and_an_ordinary_checkpoint() -> None:
    assert CHECKPOINT.stat().st_size <= 10 * 1024**2
    raw = torch.load(io.BytesIO(CHECKPOINT.read_bytes()), weights_only=True)
    assert raw["arch"] == ARCH and raw["categories"][1:] == list(CATEGORIES)
    image = generate_image(HELD_OUT_SEED, 1).pixels
    by_name = Segmenter(ModelConfig(weights="shapes", device="cpu"))
    by_path = Segmenter(ModelConfig(weights=str(CHECKPOINT), device="cpu"))
    assert by_path.weights.arch == ARCH and by_path.categories == by_name.categories
    (a,), (b,) = by_name([image]), by_path([image])
    assert len(a) > 0 and np.array_equal(a.scores, b.scores)
    assert np.array_equal(full_masks(a), full_masks(b))


def test_run_record_names_the_shipped_weights(held_out_run: dict[str, Any]) -> None:
    record = read_record(held_out_run["output"], "held-out")
    assert record["weights"]["name"] == "shapes" and record["weights"]["arch"] == ARCH
    digest = record["weights"]["sha256"]
    assert digest == fingerprint_weights(ModelConfig(weights="shapes"))["sha256"]


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Two short trainings with the same seed give the same bytes; the checkpoint loads."""
    train = _load_job("train_shapes")
    cfg = train.TrainConfig(steps=3, batch_size=2, warmup_steps=1, threads=2)
    first = train.save(train.train(cfg, log_every=0), tmp_path / "a.pt")
    second = train.save(train.train(cfg, log_every=0), tmp_path / "b.pt")
    assert first == second
    other = train.save(train.train(replace(cfg, seed=5), log_every=0), tmp_path / "c.pt")
    assert other != first
    _, info = build_model(ModelConfig(weights=str(tmp_path / "a.pt")))
    assert info.arch == ARCH and info.categories[1:] == CATEGORIES


def test_a_large_image_is_found_in_full_resolution_coordinates() -> None:
    """A held-out scene drawn at 4x its size (each pixel a 4x4 block), decoded at the model's
    scale as the job decodes it: every shape is found at the 4x image's coordinates, boxes
    and masks lining up with the shapes drawn there."""
    image = generate_image(HELD_OUT_SEED, 0)
    big = np.repeat(np.repeat(image.pixels, 4, axis=0), 4, axis=1)
    data = io.BytesIO()
    Image.fromarray(big).save(data, format="JPEG", quality=95)
    seen = decode_image(data.getvalue(), fit=(256, 448))
    assert isinstance(seen, DecodedImage) and seen.size == big.shape[:2]
    assert seen.pixels.shape[0] * seen.pixels.shape[1] * 10 < big.shape[0] * big.shape[1]
    (det,) = Segmenter(ModelConfig(weights="shapes", device="cpu"))(
        [seen.pixels], [(seen.height, seen.width)]
    )
    assert det.image_size == big.shape[:2]
    confident = det.scores >= 0.5
    masks, boxes = full_masks(det)[confident], det.boxes[confident]
    labels = [CATEGORIES[i - 1] for i in det.labels[confident]]
    for shape in image.shapes:
        truth = np.repeat(np.repeat(shape.mask, 4, axis=0), 4, axis=1)
        ious = [_iou(truth, mask) for mask in masks]
        best = int(np.argmax(ious))
        assert labels[best] == shape.category and ious[best] >= 0.8, (shape.category, ious)
        ys, xs = np.nonzero(truth)
        expected = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(boxes[best] - expected).max() <= 16, (boxes[best], expected)


def test_decoding_at_the_model_scale_keeps_coco_ap() -> None:
    """Held-out scenes drawn at 4x their size, as camera JPEGs: the model's COCO AP when they
    are decoded at its scale is within 0.02 of decoding every pixel (the test-sized version
    of jobs/photo_quality.py, whose figures are in the README)."""
    segmenter = Segmenter(ModelConfig(weights="shapes", device="cpu"))
    gt_categories = {name: i for i, name in enumerate(CATEGORIES, 1)}
    images, annotations = [], []
    results: dict[str, list[dict[str, Any]]] = {"fast": [], "full": []}
    for image_id, image in enumerate(generate(HELD_OUT_SEED, 10, scale=4), 1):
        images.append(coco_image_entry(image, image_id))
        annotations.extend(coco_annotation_entries(image, image_id, len(annotations) + 1))
        data = image.encoded("jpeg")
        for path, fit in (("fast", (256, 448)), ("full", None)):
            seen = decode_image(data, fit=fit)
            assert isinstance(seen, DecodedImage)
            assert (seen.height, seen.width) == image.pixels.shape[:2]
            assert (seen.size is not None) == (fit is not None)
            (det,) = segmenter([seen.pixels], [(seen.height, seen.width)])
            results[path].extend(
                detection_results(det, image_id, segmenter.categories, gt_categories)
            )
    gt = {"images": images, "annotations": annotations, "categories": coco_categories()}
    fast, full = (evaluate(gt, results[path]).stats for path in ("fast", "full"))
    for kind in ("bbox", "segm"):
        assert full[kind]["AP"] > 0.6
        assert abs(fast[kind]["AP"] - full[kind]["AP"]) <= 0.02, (kind, fast, full)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _load_job(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
