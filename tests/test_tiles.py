"""Tiled inference's grid and merge (segpipe/core/tiles.py), without a model or Ray.

A stand-in model that is exact by construction finds each colour of a tile as one object,
so the tiles' detections of a shape cut by a seam are exactly its parts in each tile, and
the merge must give back each shape's whole mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from segpipe.config import TileConfig
from segpipe.core.detections import Detections
from segpipe.core.tiles import Tile, merge_tiles, segment_tiled, tile_grid, tiles_of


def colour_model(
    images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]
) -> list[Detections]:
    """One detection per non-black colour of each image: label = the red channel's value,
    score = green / 255, mask = the pixels of that colour (as its window)."""
    out = []
    for image, size in zip(images, sizes, strict=True):
        assert image.shape[:2] == size
        codes = image[..., 0].astype(np.int32) * 65536 + image[..., 1].astype(np.int32) * 256
        codes += image[..., 2]
        boxes, labels, scores, masks, origins = [], [], [], [], []
        for code in np.unique(codes[codes > 0]).tolist():
            ys, xs = np.nonzero(codes == code)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes.append([x0, y0, x1, y1])
            labels.append(code >> 16)
            scores.append(((code >> 8) & 255) / 255)
            masks.append(codes[y0:y1, x0:x1] == code)
            origins.append([x0, y0])
        out.append(
            Detections(
                boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.array(labels, dtype=np.int64),
                scores=np.array(scores, dtype=np.float32),
                masks=masks,
                mask_origins=np.array(origins, dtype=np.int32).reshape(-1, 2),
                image_size=size,
            )
        )
    return out


def full_masks(det: Detections) -> list[np.ndarray]:
    height, width = det.image_size
    result = []
    for (x, y), window in zip(det.mask_origins.tolist(), det.masks, strict=True):
        canvas = np.zeros((height, width), dtype=bool)
        canvas[y : y + window.shape[0], x : x + window.shape[1]] = window
        result.append(canvas)
    return result


def disk(height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def paint(height: int, width: int, shapes: list[tuple[np.ndarray, int, int]]) -> np.ndarray:
    """An image of ``shapes`` (mask, label, score level) on black; each a colour of its own."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for k, (mask, label, level) in enumerate(shapes):
        image[mask] = (label, level, k + 1)
    return image


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(1000, 1500, 256, 64), (256, 256, 256, 64), (100, 3000, 256, 100), (999, 1001, 300, 0)],
)
def test_grid_covers_the_image_with_the_overlap(
    height: int, width: int, tile: int, overlap: int
) -> None:
    tiles = tile_grid(height, width, tile, overlap)
    covered = np.zeros((height, width), dtype=np.int32)
    for t in tiles:
        assert t.width == min(tile, width) and t.height == min(tile, height)
        assert t.x >= 0 and t.x + t.width <= width and t.y >= 0 and t.y + t.height <= height
        covered[t.y : t.y + t.height, t.x : t.x + t.width] += 1
    assert covered.min() >= 1
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    for starts, size, length in ((xs, min(tile, width), width), (ys, min(tile, height), height)):
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(b - a <= size - overlap for a, b in itertools.pairwise(starts))
    assert [(t.y, t.x) for t in tiles] == sorted((t.y, t.x) for t in tiles)  # row by row


def test_shapes_cut_by_seams_come_back_whole_and_once() -> None:
    height, width, tile, overlap = 700, 900, 256, 96
    tiles = tile_grid(height, width, tile, overlap)
    seams_x = sorted({t.x + t.width for t in tiles} - {width})
    seams_y = sorted({t.y + t.height for t in tiles} - {height})
    truth = [
        (disk(height, width, seams_x[0], 120, 40), 1, 200),  # across a vertical seam
        (disk(height, width, 400, seams_y[0], 70), 2, 180),  # larger than the overlap
        (disk(height, width, seams_x[1], seams_y[1], 45), 3, 150),  # on a crossing
        (disk(height, width, 640, 600, 30), 1, 120),  # inside one tile's own area
        (disk(height, width, seams_x[0] + 90, 120, 40), 1, 90),  # a neighbour, same class
    ]
    image = paint(height, width, truth)
    config = TileConfig(tile=tile, tile_overlap=overlap, tile_above=1)
    (merged,) = segment_tiled(colour_model, [image], [(height, width)], config, batch_size=3)
    assert len(merged) == len(truth)
    got = full_masks(merged)
    for mask, label, level in truth:
        (k,) = [k for k, m in enumerate(got) if (m & mask).any()]
        assert np.array_equal(got[k], mask)
        assert merged.labels[k] == label and merged.scores[k] == pytest.approx(level / 255)
        ys, xs = np.nonzero(mask)
        assert merged.boxes[k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert merged.scores.tolist() == sorted(merged.scores.tolist(), reverse=True)


def test_overlapping_objects_of_other_classes_or_tiles_stay_apart() -> None:
    # Two detections of one tile are never merged; another class is never merged.
    a = Tile(0, 0, 100, 100)
    b = Tile(60, 0, 100, 100)
    square = np.ones((20, 20), dtype=bool)

    def det(labels: list[int], origins: list[tuple[int, int]]) -> Detections:
        return Detections(
            boxes=np.array([[x, y, x + 20, y + 20] for x, y in origins], dtype=np.float32).reshape(
                -1, 4
            ),
            labels=np.array(labels, dtype=np.int64),
            scores=np.array([0.9 - 0.1 * k for k in range(len(labels))], dtype=np.float32),
            masks=[square] * len(labels),
            mask_origins=np.array(origins, dtype=np.int32).reshape(-1, 2),
            image_size=(100, 100),
        )

    # In image pixels: tile a holds class 1 and 2 at (70, 10); tile b class 2 there (10, 10).
    merged = merge_tiles(
        [a, b], [det([1, 2], [(70, 10), (70, 10)]), det([2], [(10, 10)])], (100, 160), 0.5, 10
    )
    assert sorted(merged.labels.tolist()) == [1, 2]
    merged = merge_tiles(
        [a, b], [det([1, 1], [(70, 10), (70, 12)]), det([], [])], (100, 160), 0.5, 10
    )
    assert len(merged) == 2
    capped = merge_tiles([a, b], [det([1, 2, 3], [(0, 0), (20, 30), (40, 60)]), det([], [])],
                         (100, 160), 0.5, 2)  # fmt: skip
    assert capped.labels.tolist() == [1, 2]


def test_small_images_go_whole_and_give_the_models_rows() -> None:
    config = TileConfig(tile=256, tile_overlap=64, tile_above=300 * 300)
    small = paint(200, 300, [(disk(200, 300, 150, 100, 50), 1, 200)])
    large = paint(400, 600, [(disk(400, 600, 250, 200, 60), 2, 100)])
    assert tiles_of((200, 300), small.shape, config) == []
    assert len(tiles_of((400, 600), large.shape, config)) == 6
    # Decoded smaller than its size (at the model's scale): not tiled.
    assert tiles_of((400, 600), (200, 300, 3), config) == []
    got = segment_tiled(colour_model, [small, large], [(200, 300), (400, 600)], config, 4)
    direct = colour_model([small, large], [(200, 300), (400, 600)])
    for mine, theirs in zip(got, direct, strict=True):
        assert mine.labels.tolist() == theirs.labels.tolist()
        assert all(
            np.array_equal(p, q) for p, q in zip(full_masks(mine), full_masks(theirs), strict=True)
        )
    with pytest.raises(ValueError, match="tile must be 0"):
        TileConfig(tile=10)
    with pytest.raises(ValueError, match="tile_overlap"):
        TileConfig(tile=256, tile_overlap=200)


def test_a_tile_the_model_fails_on_fails_its_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped model in the Segment step: a tiled image goes through as its tiles (and
    says how many); one failing tile makes its image a model_error row, the rest of the
    batch keeps its detections."""
    from segpipe.config import ModelConfig
    from segpipe.job.stages import STATUS_OK, Segment, split_tables

    tiling = TileConfig(tile=256, tile_overlap=64, tile_above=400 * 400)
    segment = Segment(ModelConfig(weights="shapes", device="cpu"), "r", tiling=tiling, batch_size=4)
    rng = np.random.default_rng(0)
    scenes = [rng.integers(0, 255, (500, 700, 3), dtype=np.uint8) for _ in range(2)]
    small = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    pixels = np.empty(3, dtype=object)
    pixels[:] = [scenes[0], small, scenes[1]]
    batch = {
        "uri": np.array(["file:///a.png", "file:///b.png", "file:///c.png"], dtype=object),
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "width": np.array([700, 300, 700], dtype=np.int32),
        "height": np.array([500, 200, 500], dtype=np.int32),
        "status": np.array([STATUS_OK] * 3, dtype=object),
        "error_code": np.array([""] * 3, dtype=object),
        "error": np.array([""] * 3, dtype=object),
        "pixels": pixels,
    }
    images, _ = split_tables(segment(batch))
    assert images.column("tiles").to_pylist() == [12, 0, 12]
    assert images.column("status").to_pylist() == ["ok"] * 3
    real = segment.segmenter.__call__
    poisoned = scenes[1]
    seen: list[int] = []

    def flaky(images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[object]:
        seen.append(len(images))
        if any(np.shares_memory(image, poisoned) for image in images):
            raise RuntimeError("a tile the model cannot take")
        return real(images, sizes)

    monkeypatch.setattr(type(segment.segmenter), "__call__", lambda self, *args: flaky(*args))
    images, _ = split_tables(segment(batch))
    rows = images.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[2]["error_code"] == "model_error" and rows[2]["tiles"] == 12
    assert "one of this image's tiles" in rows[2]["error"]
    assert max(seen) <= 4  # model inputs go in batches of batch_size, tiles included


def test_a_cut_view_of_another_class_joins_the_whole_view() -> None:
    """The model calls half a circle a triangle at a tile's border: that cut view joins the
    circle seen whole in the neighbouring tile, which gives the class and score; a second
    detection of the whole tile (another class, the model's NMS kept both) stays apart."""
    a, b = Tile(0, 0, 100, 100), Tile(60, 0, 100, 100)
    circle = disk(40, 40, 20, 20, 18)

    def det(labels: list[int], scores: list[float], origins: list[tuple[int, int]],
            windows: list[np.ndarray]) -> Detections:  # fmt: skip
        boxes = [
            [x, y, x + w.shape[1], y + w.shape[0]]
            for (x, y), w in zip(origins, windows, strict=True)
        ]
        return Detections(
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.array(labels, dtype=np.int64),
            scores=np.array(scores, dtype=np.float32),
            masks=windows,
            mask_origins=np.array(origins, dtype=np.int32).reshape(-1, 2),
            image_size=(100, 100),
        )

    # Image x 80..120: whole in tile b (at 20..60), cut by tile a's right border at x = 100.
    whole = det([1, 2], [0.9, 0.3], [(20, 30), (19, 29)], [circle, np.ones((42, 42), bool)])
    cut = det([3], [0.95], [(80, 30)], [circle[:, :20]])
    merged = merge_tiles([a, b], [cut, whole], (100, 160), 0.5, 10)
    assert merged.labels.tolist() == [1, 2]
    assert merged.scores.tolist() == pytest.approx([0.9, 0.3])
    assert np.array_equal(full_masks(merged)[0][30:70, 80:120], circle)
