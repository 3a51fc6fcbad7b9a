"""The shapes dataset: deterministic, varied, and its annotations exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from segpipe.core.decode import DecodedImage, decode_image
from segpipe.tools.shapes import CATEGORIES, MIN_PIXELS, generate, generate_image, write_dataset


def test_same_seed_same_image_other_seed_other_image() -> None:
    a, b = generate_image(7, 3), generate_image(7, 3)
    assert np.array_equal(a.pixels, b.pixels)
    assert [s.category for s in a.shapes] == [s.category for s in b.shapes]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.shapes, b.shapes, strict=True))
    assert a.png() == b.png()
    assert not np.array_equal(generate_image(8, 3).pixels[:50, :50], a.pixels[:50, :50])
    # An image does not depend on how many were generated before it.
    assert np.array_equal(next(generate(7, 2, start=3)).pixels, a.pixels)


def test_masks_are_exact_and_visible() -> None:
    for image in generate(1, 30):
        height, width, _ = image.pixels.shape
        covered = np.zeros((height, width), dtype=np.int32)
        for shape in image.shapes:
            assert shape.mask.shape == (height, width) and shape.mask.dtype == bool
            assert shape.mask.sum() >= MIN_PIXELS
            # Painted without anti-aliasing: every annotated pixel has the shape's colour.
            assert (image.pixels[shape.mask] == shape.colour).all()
            covered += shape.mask
        assert covered.max() <= 1, "visible masks must not overlap"


def test_variety() -> None:
    images = list(generate(0, 60))
    sizes = {image.pixels.shape[:2] for image in images}
    aspects = [w / h for h, w in sizes]
    assert len(sizes) > 40 and min(aspects) < 0.8 and max(aspects) > 1.25
    counts = {name: 0 for name in CATEGORIES}
    occluded = 0
    for image in images:
        for shape in image.shapes:
            counts[shape.category] += 1
        occluded += _has_occlusion(image.shapes)
    assert all(n >= 20 for n in counts.values()), counts
    assert occluded >= 5, "some shapes must overlap others"
    assert max(len(image.shapes) for image in images) >= 5
    colours = {shape.colour for image in images for shape in image.shapes}
    assert len(colours) > 100


def test_written_dataset_reads_back_through_pycocotools_and_the_decoder(tmp_path: Path) -> None:
    gt = write_dataset(str(tmp_path / "ds"), seed=3, count=6)
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == sorted(["annotations.json", *(img["file_name"] for img in gt["images"])])
    coco = COCO(str(tmp_path / "ds" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert json.loads((tmp_path / "ds" / "annotations.json").read_text()) == gt
    for image, entry in zip(generate(3, 6), coco.loadImgs(coco.getImgIds()), strict=True):
        decoded = decode_image((tmp_path / "ds" / entry["file_name"]).read_bytes())
        assert isinstance(decoded, DecodedImage)
        assert np.array_equal(decoded.pixels, image.pixels)  # PNG: lossless
        anns = coco.loadAnns(coco.getAnnIds(imgIds=entry["id"]))
        assert len(anns) == len(image.shapes)
        for ann, shape in zip(anns, image.shapes, strict=True):
            assert CATEGORIES[ann["category_id"] - 1] == shape.category
            assert np.array_equal(coco.annToMask(ann).astype(bool), shape.mask)
            ys, xs = np.nonzero(shape.mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert ann["area"] == shape.mask.sum() and ann["iscrowd"] == 0


def _has_occlusion(shapes: tuple) -> bool:
    """True when one shape's bounding box overlaps another's."""
    boxes = []
    for shape in shapes:
        ys, xs = np.nonzero(shape.mask)
        boxes.append((xs.min(), ys.min(), xs.max(), ys.max()))
    return any(
        a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )
