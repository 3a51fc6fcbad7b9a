"""Shapes scenes: deterministic, shapes at the trained sizes, exact windows and COCO RLE, and
seam scenes whose every shape lies across a given line."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segpipe.tools.scenes import (
    MAX_SIZE,
    MIN_SIZE,
    Scene,
    SceneShape,
    coco_scene_annotations,
    generate_scene,
    seam_scene,
    write_scenes,
)
from segpipe.tools.shapes import CATEGORIES, MIN_PIXELS, MIN_VISIBLE, ImageFormat, _shape_mask


def test_same_arguments_same_scene_other_arguments_other_scene() -> None:
    a, b = generate_scene(4, 2, 500, 600), generate_scene(4, 2, 500, 600)
    assert a.encoded() == b.encoded()
    assert _described(a) == _described(b)
    assert all(np.array_equal(x.window, y.window) for x, y in zip(a.shapes, b.shapes, strict=True))
    for other in (generate_scene(4, 3, 500, 600), generate_scene(5, 2, 500, 600)):
        assert not np.array_equal(other.pixels, a.pixels)
    seams = ([300], [250])
    c, d = seam_scene(4, 2, 500, 600, *seams), seam_scene(4, 2, 500, 600, *seams)
    assert c.encoded() == d.encoded() and _described(c) == _described(d)
    # Same seed, index and size: the same background, under other shapes.
    bare = np.ones((500, 600), dtype=bool)
    for shape in (*a.shapes, *c.shapes):
        bare &= ~_placed(shape, 500, 600)
    assert bare.mean() > 0.5 and np.array_equal(a.pixels[bare], c.pixels[bare])
    assert a.file_name_as("png") == "scene_s4_000002_600x500.png"
    assert c.file_name_as("jpeg") == "seams_s4_000002_600x500.jpg"


def test_windows_are_the_visible_pixels_by_the_shapes_rules() -> None:
    occluded = 0
    for index in range(3):
        # Denser than the default, so that shapes hide parts of one another.
        scene = generate_scene(1, index, 500, 600, density=60)
        height, width = scene.pixels.shape[:2]
        assert len(scene.shapes) >= 12
        fulls = [_full_mask(shape, height, width) for shape in scene.shapes]
        later = np.zeros((height, width), dtype=bool)
        for shape, full in zip(scene.shapes[::-1], fulls[::-1], strict=True):
            x, y, w, h = shape.bbox
            assert 0 <= x <= width - w and 0 <= y <= height - h
            assert shape.window.dtype == bool and shape.window.flags.c_contiguous
            expected = full & ~later
            assert np.array_equal(_placed(shape, height, width), expected)
            # The window is tight: its first and last rows and columns hold visible pixels.
            assert shape.window[[0, -1]].any(axis=1).all()
            assert shape.window[:, [0, -1]].any(axis=0).all()
            assert shape.area >= MIN_PIXELS and shape.area >= MIN_VISIBLE * full.sum()
            occluded += shape.area < full.sum()
            # Painted without anti-aliasing: every annotated pixel has the shape's colour.
            assert (scene.pixels[y : y + h, x : x + w][shape.window] == shape.colour).all()
            later |= full
    assert occluded >= 3, "some shapes must hide parts of others"


def test_a_large_scene_has_many_shapes_at_the_trained_sizes() -> None:
    scene = generate_scene(0, 0, 1536, 2048)
    assert scene.pixels.shape == (1536, 2048, 3) and scene.pixels.dtype == np.uint8
    assert 70 <= len(scene.shapes) <= round(25 * 2048 * 1536 / 1e6)  # the default density
    assert {s.category for s in scene.shapes} == set(CATEGORIES)
    assert len({s.colour for s in scene.shapes}) > 50
    for shape in scene.shapes:
        assert MIN_SIZE <= shape.size <= MAX_SIZE
        x, y, w, h = shape.bbox
        assert 0 <= x <= 2048 - w and 0 <= y <= 1536 - h
        # No side longer than the shape's widest extent (a square's diagonal).
        assert max(w, h) <= math.ceil(shape.size * math.sqrt(2)) + 1
        assert shape.area >= MIN_PIXELS
    # Spread over the whole canvas, not bunched in a corner.
    centres = np.array([s.centre for s in scene.shapes])
    assert centres[:, 0].min() < 400 and centres[:, 0].max() > 1648
    assert centres[:, 1].min() < 400 and centres[:, 1].max() > 1136


def test_coco_rle_is_each_window_at_its_origin() -> None:
    scene = generate_scene(2, 0, 500, 600, density=60)
    entries = coco_scene_annotations(scene, image_id=7, first_annotation_id=11)
    assert [e["id"] for e in entries] == list(range(11, 11 + len(scene.shapes)))
    for entry, shape in zip(entries, scene.shapes, strict=True):
        assert entry["image_id"] == 7 and entry["iscrowd"] == 0
        assert CATEGORIES[entry["category_id"] - 1] == shape.category
        rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"]}
        assert rle["size"] == [500, 600]
        decoded = mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool)
        assert np.array_equal(decoded, _placed(shape, 500, 600))
        assert entry["bbox"] == [float(v) for v in shape.bbox]
        assert entry["area"] == shape.area


def test_seam_scene_puts_every_shape_across_a_line() -> None:
    seams_x, seams_y = [256, 512, 768], [256, 512]
    scene = seam_scene(3, 0, 700, 900, seams_x, seams_y)
    height, width = scene.pixels.shape[:2]
    assert (scene.seams_x, scene.seams_y) == (tuple(seams_x), tuple(seams_y))
    assert len(scene.shapes) >= 10
    covered = np.zeros((height, width), dtype=np.int32)
    on_crossings = 0
    for shape in scene.shapes:
        assert MIN_SIZE <= shape.size <= MAX_SIZE
        full = _full_mask(shape, height, width)
        placed = _placed(shape, height, width)
        assert np.array_equal(placed, full), "a seam scene's shapes are wholly visible"
        covered += placed
        cx, cy = shape.centre
        crossed = [s for s in seams_x if cx == s] + [s for s in seams_y if cy == s]
        assert crossed, "every shape is centred on a line"
        on_crossings += cx in seams_x and cy in seams_y
        # It has pixels on both sides of each line its centre is on.
        if cx in seams_x:
            assert placed[:, : int(cx)].any() and placed[:, int(cx) :].any()
        if cy in seams_y:
            assert placed[: int(cy)].any() and placed[int(cy) :].any()
    assert covered.max() <= 1, "seam scene shapes never overlap"
    assert on_crossings >= 3
    assert {s.category for s in scene.shapes} == set(CATEGORIES)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="height"):
        generate_scene(0, 0, 100, 600)
    with pytest.raises(ValueError, match="density"):
        generate_scene(0, 0, 300, 300, density=0)
    with pytest.raises(ValueError, match="seams_x"):
        seam_scene(0, 0, 300, 300, [300], [])
    with pytest.raises(ValueError, match="line"):
        seam_scene(0, 0, 300, 300, [], [])


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_written_scenes_read_back(tmp_path: Path, fmt: ImageFormat) -> None:
    root = tmp_path / "scenes"
    gt = write_scenes(str(root), seed=6, count=2, height=300, width=400, fmt=fmt, start=1)
    names = [image["file_name"] for image in gt["images"]]
    suffix = ".png" if fmt == "png" else ".jpg"
    assert names == [f"scene_s6_00000{i}_400x300{suffix}" for i in (1, 2)]
    assert sorted(p.name for p in root.iterdir()) == sorted(["annotations.json", *names])
    assert json.loads((root / "annotations.json").read_text()) == gt
    coco = COCO(str(root / "annotations.json"))
    for index, entry in zip((1, 2), coco.loadImgs(coco.getImgIds()), strict=True):
        scene = generate_scene(6, index, 300, 400)
        decoded = np.asarray(Image.open(io.BytesIO((root / entry["file_name"]).read_bytes())))
        if fmt == "png":
            assert np.array_equal(decoded, scene.pixels)
        else:
            assert np.abs(decoded.astype(int) - scene.pixels).mean() < 6
        anns = coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))
        assert len(anns) == len(scene.shapes) > 0
        for ann, shape in zip(anns, scene.shapes, strict=True):
            assert np.array_equal(coco.annToMask(ann).astype(bool), _placed(shape, 300, 400))


def test_written_seam_scenes(tmp_path: Path) -> None:
    gt = write_scenes(str(tmp_path), seed=2, count=1, height=400, width=500, seams=([250], [200]))
    assert [image["file_name"] for image in gt["images"]] == ["seams_s2_000000_500x400.png"]
    scene = seam_scene(2, 0, 400, 500, [250], [200])
    assert len(gt["annotations"]) == len(scene.shapes) > 0


def _described(scene: Scene) -> list[tuple[object, ...]]:
    return [(s.category, s.origin, s.colour, s.centre, s.size, s.angle) for s in scene.shapes]


def _placed(shape: SceneShape, height: int, width: int) -> np.ndarray:
    """The shape's window placed in a full-size mask (small scenes only)."""
    mask = np.zeros((height, width), dtype=bool)
    x, y, w, h = shape.bbox
    mask[y : y + h, x : x + w] = shape.window
    return mask


def _full_mask(shape: SceneShape, height: int, width: int) -> np.ndarray:
    """The pixels whose centre lies inside the shape, over the whole (small) scene."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    cx, cy = shape.centre
    return _shape_mask(shape.category, xs, ys, cx, cy, shape.size, shape.angle)
