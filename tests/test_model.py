"""The detector: parity with torchvision, and every way of getting weights."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.transforms.functional import to_tensor

from segpipe.config import ModelConfig
from segpipe.core.encode import decode_mask
from segpipe.core.model import Segmenter, resolve_device
from segpipe.core.rows import ImageRef
from segpipe.core.weights import (
    COCO_CATEGORIES,
    WeightsError,
    _torchvision_weights,
    build_model,
    load_checkpoint,
)
from segpipe.io import sha256_hex
from tests.masks import instances_rows

# Small images and settings keep a CPU forward pass of R50-FPN well under a second.
SMALL = dict(min_size=96, max_size=160, max_detections=12)


def make_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, height - 10), rng.integers(0, width - 10)
        h, w = rng.integers(8, height // 2), rng.integers(8, width // 2)
        image[y : y + h, x : x + w] = rng.integers(0, 255, 3)
    return image


def reference_model(num_classes: int = 91, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint: Path) -> Path:
    """A state dict saved by the test: a seeded random R50-FPN Mask R-CNN (91 classes)."""
    assert torch.equal(
        torch.load(random_checkpoint, weights_only=True)["backbone.fpn.layer_blocks.0.0.bias"],
        reference_model().state_dict()["backbone.fpn.layer_blocks.0.0.bias"],
    )
    return random_checkpoint


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [make_image(90, 120, seed=1), make_image(110, 70, seed=2)]


@pytest.mark.parametrize("mask_threshold", [0.5, 0.3])
def test_parity_with_a_direct_torchvision_call(
    checkpoint: Path, images: list[np.ndarray], mask_threshold: float
) -> None:
    cfg = ModelConfig(weights=str(checkpoint), device="cpu", mask_threshold=mask_threshold, **SMALL)
    segmenter = Segmenter(cfg)
    ours = segmenter(images)

    direct = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        min_size=96,
        max_size=160,
        box_detections_per_img=12,
    )
    direct.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.inference_mode():
        theirs = direct.eval()([to_tensor(image) for image in images])

    refs = [
        ImageRef("run", f"id{i}", f"u{i}", image.shape[1], image.shape[0])
        for i, image in enumerate(images)
    ]
    table = instances_rows(refs, ours, segmenter.categories).to_pylist()
    total = 0
    for i, (det, ref_out) in enumerate(zip(ours, theirs, strict=True)):
        assert len(det) > 0, "random weights should still produce detections"
        np.testing.assert_array_equal(det.boxes, ref_out["boxes"].numpy())
        np.testing.assert_array_equal(det.labels, ref_out["labels"].numpy())
        np.testing.assert_array_equal(det.scores, ref_out["scores"].numpy())
        expected_masks = (ref_out["masks"][:, 0] > mask_threshold).numpy()
        rows = [r for r in table if r["image_id"] == f"id{i}"]
        assert len(rows) == len(det)
        for row, expected in zip(rows, expected_masks, strict=True):
            mask = decode_mask(row["mask_rle"], row["image_height"], row["image_width"])
            np.testing.assert_array_equal(mask.astype(bool), expected)
            assert row["mask_area"] == expected.sum()
            total += int(expected.sum())
    assert total > 0, "parity must compare some non-empty masks"


def test_checkpoint_through_fsspec_and_sha256_pin(checkpoint: Path, s3_env: str) -> None:
    data = checkpoint.read_bytes()
    digest = sha256_hex(data)
    fs = fsspec.filesystem("s3")
    fs.makedirs("models", exist_ok=True)
    with fs.open("models/maskrcnn.pt", "wb") as f:
        f.write(data)

    for uri in (f"file://{checkpoint}", str(checkpoint), "s3://models/maskrcnn.pt"):
        loaded = load_checkpoint(uri, expected_sha256=digest)
        assert loaded.sha256 == digest
        assert loaded.categories is None and loaded.arch is None

    # The whole model from S3, pinned; the run record gets the hash, never credentials.
    cfg = ModelConfig(weights="s3://models/maskrcnn.pt", weights_sha256=digest.upper(), **SMALL)
    model, info = build_model(cfg)
    assert (info.kind, info.name, info.sha256) == ("checkpoint", "s3://models/maskrcnn.pt", digest)
    assert info.categories == COCO_CATEGORIES
    assert not model.training


def test_sha256_mismatch_is_refused(checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match=r"SHA-256 .* but 0+ was required"):
        load_checkpoint(str(checkpoint), expected_sha256="0" * 64)


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_checkpoint(str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a Mask R-CNN state dict"):
        build_model(ModelConfig(weights=str(tmp_path / "other.pt"), **SMALL))


def test_pickled_objects_are_not_executed(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("code ran",))

    torch.save({"model": {}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only"):
        load_checkpoint(str(tmp_path / "evil.pt"))


def test_weights_that_do_not_match_the_arch(checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match="does not fit maskrcnn_resnet50_fpn_v2"):
        build_model(ModelConfig(arch="maskrcnn_resnet50_fpn_v2", weights=str(checkpoint), **SMALL))


def test_custom_classes_with_names_in_the_checkpoint(tmp_path: Path) -> None:
    state = reference_model(num_classes=4).state_dict()
    names = ["circle", "square", "triangle"]
    path = tmp_path / "shapes.pt"
    torch.save({"model": state, "categories": names, "arch": "maskrcnn_resnet50_fpn"}, path)
    _, info = build_model(ModelConfig(weights=str(path), **SMALL))
    assert info.categories == ("__background__", "circle", "square", "triangle")

    v2 = {"model": state, "arch": "maskrcnn_resnet50_fpn_v2", "categories": names}
    torch.save(v2, tmp_path / "v2.pt")
    with pytest.raises(WeightsError, match="saved for arch 'maskrcnn_resnet50_fpn_v2'"):
        build_model(
            ModelConfig(arch="maskrcnn_resnet50_fpn", weights=str(tmp_path / "v2.pt"), **SMALL)
        )
    # arch=auto follows the checkpoint's record, which here lies about the state dict.
    with pytest.raises(WeightsError, match="does not fit maskrcnn_resnet50_fpn_v2"):
        build_model(ModelConfig(weights=str(tmp_path / "v2.pt"), **SMALL))


def test_custom_classes_with_names_in_a_side_file(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(reference_model(num_classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match="carries no category names"):
        build_model(ModelConfig(weights=str(path), **SMALL))

    coco = tmp_path / "cats.json"
    coco.write_text(
        json.dumps({"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]})
    )
    text = tmp_path / "cats.txt"
    text.write_text("__background__\ncat\ndog\n")
    for side in (coco, text):
        _, info = build_model(ModelConfig(weights=str(path), categories=str(side), **SMALL))
        assert info.categories == ("__background__", "cat", "dog")

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(["a", "b", "c", "d"]))
    with pytest.raises(WeightsError, match="4 category names given for a model with 3 classes"):
        build_model(ModelConfig(weights=str(path), categories=str(wrong), **SMALL))


def test_torchvision_weights_names() -> None:
    arch = "maskrcnn_resnet50_fpn"
    assert str(_torchvision_weights(arch, "DEFAULT")) == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert _torchvision_weights(arch, "MaskRCNN_ResNet50_FPN_Weights.COCO_V1") is not None
    assert _torchvision_weights(arch, "s3://bucket/model.pt") is None
    assert _torchvision_weights(arch, "model.pth") is None
    with pytest.raises(WeightsError, match="are for maskrcnn_resnet50_fpn_v2"):
        _torchvision_weights(arch, "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1")
    with pytest.raises(WeightsError, match="not a torchvision weights name"):
        _torchvision_weights(arch, "IMAGENET1K_V2")


def test_torchvision_weights_from_the_local_cache(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `DEFAULT` path with the file already in torchvision's cache (as on a worker whose
    image has the weights baked in): no download, torchvision's own loader, COCO names."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth").write_bytes(checkpoint.read_bytes())
    model, info = build_model(ModelConfig(weights="DEFAULT", **SMALL))
    assert info.kind == "torchvision" and info.name.endswith("COCO_V1")
    assert info.categories == COCO_CATEGORIES and len(info.categories) == 91
    assert not model.training


def test_random_weights_are_announced_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _, info = build_model(ModelConfig(weights="none", **SMALL))
    assert info.kind == "none" and info.categories == COCO_CATEGORIES
    assert "RANDOMLY INITIALISED" in caplog.text and "meaningless" in caplog.text


def test_settings_reach_the_model() -> None:
    cfg = ModelConfig(weights="none", min_size=200, max_size=300, score_threshold=0.3,
                      max_detections=7)  # fmt: skip
    model, _ = build_model(cfg)
    assert model.transform.min_size == (200,) and model.transform.max_size == 300
    assert model.roi_heads.score_thresh == 0.3
    assert model.roi_heads.detections_per_img == 7


def test_defaults_equal_torchvision() -> None:
    cfg = ModelConfig()
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    model, info = build_model(replace(cfg, weights="none"))
    assert info.arch == "maskrcnn_resnet50_fpn"
    assert model.transform.min_size == tv.transform.min_size == (info.min_size,)
    assert model.transform.max_size == tv.transform.max_size == info.max_size
    assert cfg.score_threshold == tv.roi_heads.score_thresh
    assert cfg.max_detections == tv.roi_heads.detections_per_img
    assert cfg.mask_threshold == 0.5


def test_bad_settings_fail_fast() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig(arch="yolo")
    with pytest.raises(ValueError, match="min_size <= max_size"):
        ModelConfig(min_size=900, max_size=800)
    with pytest.raises(ValueError, match="unknown device"):
        ModelConfig(device="tpu")


def test_empty_batch_and_bad_pixels(checkpoint: Path) -> None:
    segmenter = Segmenter(ModelConfig(weights=str(checkpoint), device="cpu", **SMALL))
    assert segmenter([]) == []
    with pytest.raises(ValueError, match="uint8"):
        segmenter([np.zeros((10, 10), dtype=np.uint8)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(
    checkpoint: Path, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 on the GPU is the CPU's arithmetic. cuDNN convolutions default to TF32 on Ampere
    and later (scores then differ by ~0.004 on an H200, enough to reorder close detections of
    random weights), so TF32 is off for the comparison."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = Segmenter(ModelConfig(weights=str(checkpoint), device="cpu", **SMALL))(images)
    gpu = Segmenter(ModelConfig(weights=str(checkpoint), device="cuda", **SMALL))(images)
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.scores[:3], b.scores[:3], atol=1e-3)
        np.testing.assert_allclose(a.boxes[:3], b.boxes[:3], atol=0.5)


def test_masks_are_computed_only_for_returned_detections(
    checkpoint: Path, images: list[np.ndarray]
) -> None:
    """The score threshold (and max_detections) apply before the mask head: it sees exactly
    the boxes that come back, not every proposal."""
    cfg = ModelConfig(weights=str(checkpoint), device="cpu", score_threshold=0.0, **SMALL)
    segmenter = Segmenter(replace(cfg, max_detections=100))
    seen: list[int] = []
    hook = segmenter.model.roi_heads.mask_head.register_forward_hook(
        lambda _m, args, _out: seen.append(int(args[0].shape[0]))
    )
    try:
        found = segmenter(images)
        assert seen[-1] == sum(len(d) for d in found) == 100 * len(images)
        # A threshold at the median score: the mask head sees half as many boxes.
        median = float(np.median(np.concatenate([d.scores for d in found])))
        segmenter.model.roi_heads.score_thresh = median
        found = segmenter(images)
        assert seen[-1] == sum(len(d) for d in found) < 100 * len(images)
        assert all((d.scores >= median).all() for d in found)
    finally:
        hook.remove()
