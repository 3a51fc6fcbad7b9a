"""Shapes scenes: large images holding many shapes, with exact instance ground truth.

A scene is a canvas of any size (thousands of pixels a side: an aerial view, a scanned
sheet) covered by the shapes dataset's textured background (:mod:`segpipe.tools.shapes`) and
holding many shapes of its three classes, ``circle``, ``square`` and ``triangle``, at the
sizes the shipped shapes model was trained on. It is the ground truth for tiled inference:
a tile cut from a scene at native scale shows shapes as the model saw them in training.

- Sizes: a shape's ``size`` (a circle's diameter, a square's or a triangle's side) is drawn
  uniformly from :data:`MIN_SIZE` .. :data:`MAX_SIZE`, about 46-115 pixels. Training images
  (short side 160-320) held shapes of ``0.18 .. 0.45`` times the short side and were rescaled
  to a short side of 256 (the checkpoint's ``min_size``), so the model learnt shapes of
  ``0.18 * 256 .. 0.45 * 256`` pixels; a 256-pixel tile of a scene, run at native scale, shows
  shapes at those sizes.
- :func:`generate_scene`: ``round(density * height * width / 1e6)`` shapes (by default 25
  per million pixels, one per 200 x 200: 79 on 2048 x 1536), each wholly inside the canvas
  before occlusion, at random centres, rotations and colours (the shapes dataset's
  ``_fill_colour``: far enough from the background's mean), painted in order and overlapping
  one another. The ground truth follows the shapes dataset's rules: a shape's mask is the set
  of pixels whose *centre* lies inside it, minus the pixels of shapes painted after it, and
  every annotated shape keeps at least ``MIN_VISIBLE`` of its own area and ``MIN_PIXELS``
  pixels. A candidate that would leave an earlier shape below that is dropped; after
  ``_ATTEMPTS_PER_SHAPE`` candidates per wanted shape the scene keeps what it has (never
  seen at the default density).
- :func:`seam_scene`: shapes placed on purpose across given vertical lines ``x = s`` and
  horizontal lines ``y = s`` (the tile seams of a test): each has its centre on a line, one
  on every crossing of two lines where it fits, the rest along the lines, about one per
  ``spacing`` pixels. They never overlap (their circumscribed circles stay ``_GAP`` pixels
  apart), so each is wholly visible, and each is wholly inside the canvas; a line nearer the
  border than a shape's circumradius gets only the shapes small enough to fit.
- A shape is kept as its *window*: a bool array over the bounding box of its visible pixels
  and that box's top-left ``(x, y)``. COCO annotations (:func:`coco_scene_annotations`) are
  compressed RLE over the whole image computed from the window
  (:func:`segpipe.core.encode.encode_window`), with ``bbox`` and ``area`` from that RLE by
  pycocotools, category ids 1..3 in the order of :data:`~segpipe.tools.shapes.CATEGORIES`.

Determinism: a scene depends only on its arguments; its random stream is
``numpy.random.default_rng([seed, index, height, width])`` and its pixel noise comes from
``numpy.random.default_rng([seed, index, height, width, 1])``. The background is drawn
first, so :func:`generate_scene` and :func:`seam_scene` with the same seed, index and size
share it. The background's parameters are the shapes dataset's (drawn by its own procedure
on a 16 x 16 stand-in; the blotches' coarse grid is then drawn at the scene's size), painted
at scale 1, so its stripes, checks and blotches have the same pixel sizes as in training.

Memory stays near the uint8 image (3 bytes a pixel): the background is painted a band of
rows at a time (float32, about 2**20 pixels a band), each shape's pixel-centre test runs in
its bounding window, and occlusion is tracked in an owner map of the canvas (int16: 2 bytes
a pixel; int32 from 32,768 shapes on), freed before the scene is returned. No full-size mask
is ever made, for a shape or for its annotation. An 8000 x 6000 scene (48 Mpx, ~1,200
shapes) needs about 144 MiB for its pixels and 96 MiB for the owner map while it is built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segpipe.core.encode import encode_window
from segpipe.io import fs_root
from segpipe.tools.shapes import (
    _BAND_PIXELS,
    _EXTENSIONS,
    CATEGORIES,
    ImageFormat,
    ShapesImage,
    _background,
    _fill_colour,
    _shape_mask,
    _texture_band,
    _visible_enough,
    coco_categories,
)

_TRAINED_SHORT_SIDE = 256  # the shipped checkpoint's transform min_size
MIN_SIZE = 0.18 * _TRAINED_SHORT_SIDE  # 46.08 pixels
MAX_SIZE = 0.45 * _TRAINED_SHORT_SIDE  # 115.2 pixels
MIN_SIDE = 256  # a scene's smallest height or width
DEFAULT_DENSITY = 25.0  # shapes per million pixels: one per 200 x 200
DEFAULT_SPACING = 250.0  # seam scenes: pixels of line per attempted shape
_GAP = 4.0  # seam scenes: least distance between two shapes' circumscribed circles
_ATTEMPTS_PER_SHAPE = 4  # generate_scene gives up after this many candidates per wanted shape


@dataclass(frozen=True)
class SceneShape:
    category: str
    window: np.ndarray  # bool (h, w): the visible pixels over their bounding box
    origin: tuple[int, int]  # (x, y) of the window's top-left pixel in the scene
    colour: tuple[int, int, int]
    centre: tuple[float, float]  # (cx, cy); pixel (row r, column c) spans x c..c+1, y r..r+1
    size: float  # a circle's diameter, a square's or a triangle's side
    angle: float  # rotation of squares and triangles, radians

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of the window: the visible pixels' bounding box."""
        height, width = self.window.shape
        return self.origin[0], self.origin[1], width, height

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.window))


@dataclass(frozen=True)
class Scene:
    seed: int
    index: int
    pixels: np.ndarray  # uint8 (H, W, 3)
    shapes: tuple[SceneShape, ...]
    seams_x: tuple[int, ...] = ()  # seam scenes: the vertical lines x = s
    seams_y: tuple[int, ...] = ()  # seam scenes: the horizontal lines y = s

    def file_name_as(self, fmt: ImageFormat = "png") -> str:
        """``scene_s{seed}_{index:06d}_{W}x{H}.png`` (``seams_...`` for a seam scene; ``.jpg``
        for JPEG)."""
        height, width = self.pixels.shape[:2]
        kind = "seams" if self.seams_x or self.seams_y else "scene"
        return f"{kind}_s{self.seed}_{self.index:06d}_{width}x{height}{_EXTENSIONS[fmt]}"

    def encoded(self, fmt: ImageFormat = "png", quality: int = 92) -> bytes:
        """The image as PNG (lossless) or baseline JPEG of ``quality``, encoded as the shapes
        dataset encodes its images."""
        return ShapesImage(self.seed, self.index, self.pixels, ()).encoded(fmt, quality)


def generate_scene(
    seed: int, index: int, height: int, width: int, density: float = DEFAULT_DENSITY
) -> Scene:
    """Scene ``index`` of seed ``seed``, ``height`` x ``width`` pixels, with about ``density``
    shapes per million pixels, overlapping (see the module docstring)."""
    _check_canvas(height, width)
    if not density > 0:
        raise ValueError(f"density must be > 0 shapes per million pixels, not {density!r}")
    rng = np.random.default_rng([seed, index, height, width])
    pixels, mean = _paint_background(rng, seed, index, height, width)
    wanted = max(1, round(density * height * width / 1e6))
    owner = np.full((height, width), -1, dtype=np.int16 if wanted < 2**15 else np.int32)
    placed: list[_Placement] = []
    full_areas: list[int] = []
    visible: list[int] = []
    for _ in range(_ATTEMPTS_PER_SHAPE * wanted):
        if len(placed) == wanted:
            break
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        reach = _reach(size)
        cx = float(rng.uniform(reach, width - reach))
        cy = float(rng.uniform(reach, height - reach))
        angle = float(rng.uniform(0, 2 * math.pi))
        full, x0, y0 = _window_mask(category, cx, cy, size, angle, height, width)
        area = int(np.count_nonzero(full))
        if not _visible_enough(area, area):  # on top, it is all visible: only its pixel count
            continue
        # Painting this shape must leave every earlier one visible enough.
        region = owner[y0 : y0 + full.shape[0], x0 : x0 + full.shape[1]]
        covered = region[full]
        ids, lost = np.unique(covered[covered >= 0], return_counts=True)
        if not all(
            _visible_enough(visible[k] - n, full_areas[k])
            for k, n in zip(ids.tolist(), lost.tolist(), strict=True)
        ):
            continue
        for k, n in zip(ids.tolist(), lost.tolist(), strict=True):
            visible[k] -= n
        region[full] = len(placed)
        colour = _fill_colour(rng, mean)
        placed.append(_Placement(category, cx, cy, size, angle, colour, x0, y0, full.shape))
        full_areas.append(area)
        visible.append(area)
    shapes = []
    for k, p in enumerate(placed):
        h, w = p.shape
        mine = owner[p.y0 : p.y0 + h, p.x0 : p.x0 + w] == k
        shapes.append(_visible_shape(p, mine, pixels))
    del owner
    return Scene(seed, index, pixels, tuple(shapes))


def seam_scene(
    seed: int,
    index: int,
    height: int,
    width: int,
    seams_x: Sequence[int],
    seams_y: Sequence[int],
    spacing: float = DEFAULT_SPACING,
) -> Scene:
    """A scene whose shapes all lie across the vertical lines ``x = s`` for ``s`` in
    ``seams_x`` and the horizontal lines ``y = s`` for ``s`` in ``seams_y``: centred on a line
    (or on a crossing of two), wholly visible, about one per ``spacing`` pixels of line (see
    the module docstring)."""
    _check_canvas(height, width)
    lines_x, lines_y = tuple(int(s) for s in seams_x), tuple(int(s) for s in seams_y)
    if not lines_x and not lines_y:
        raise ValueError("a seam scene needs at least one line")
    for name, lines, extent in (("seams_x", lines_x, width), ("seams_y", lines_y, height)):
        if any(not 0 < s < extent for s in lines):
            raise ValueError(f"{name} must lie strictly inside 0..{extent}, not {lines}")
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0 pixels, not {spacing!r}")
    rng = np.random.default_rng([seed, index, height, width])
    pixels, mean = _paint_background(rng, seed, index, height, width)
    # Centres to try, each with None where the coordinate is free along its line: every
    # crossing first, then a number of points along each line in proportion to its length.
    centres: list[tuple[float | None, float | None]] = [(x, y) for x in lines_x for y in lines_y]
    centres += [(x, None) for x in lines_x for _ in range(max(1, round(height / spacing)))]
    centres += [(None, y) for y in lines_y for _ in range(max(1, round(width / spacing)))]
    circles: list[tuple[float, float, float]] = []  # (cx, cy, reach) of the placed shapes
    shapes = []
    for fixed_x, fixed_y in centres:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
        reach = _reach(size)
        cx = float(fixed_x) if fixed_x is not None else float(rng.uniform(reach, width - reach))
        cy = float(fixed_y) if fixed_y is not None else float(rng.uniform(reach, height - reach))
        angle = float(rng.uniform(0, 2 * math.pi))
        inside = reach <= cx <= width - reach and reach <= cy <= height - reach
        if not inside or any(
            math.hypot(cx - ox, cy - oy) < reach + other + _GAP for ox, oy, other in circles
        ):
            continue
        full, x0, y0 = _window_mask(category, cx, cy, size, angle, height, width)
        colour = _fill_colour(rng, mean)
        circles.append((cx, cy, reach))
        p = _Placement(category, cx, cy, size, angle, colour, x0, y0, full.shape)
        shapes.append(_visible_shape(p, full, pixels))
    return Scene(seed, index, pixels, tuple(shapes), lines_x, lines_y)


def coco_scene_image_entry(scene: Scene, image_id: int, fmt: ImageFormat = "png") -> dict[str, Any]:
    height, width = scene.pixels.shape[:2]
    file_name = scene.file_name_as(fmt)
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def coco_scene_annotations(
    scene: Scene, image_id: int, first_annotation_id: int
) -> list[dict[str, Any]]:
    """COCO instance annotations of ``scene``'s shapes, in paint order, ids from
    ``first_annotation_id``: RLE over the whole image, made from each window."""
    height, width = scene.pixels.shape[:2]
    entries = []
    for k, shape in enumerate(scene.shapes):
        x, y = shape.origin
        counts, _ = encode_window(shape.window, x, y, height, width)
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
        entries.append(
            {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": CATEGORIES.index(shape.category) + 1,
                "segmentation": {"size": [height, width], "counts": counts},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return entries


def write_scenes(
    destination: str,
    seed: int,
    count: int,
    height: int,
    width: int,
    fmt: ImageFormat = "png",
    quality: int = 92,
    start: int = 0,
    seams: tuple[Sequence[int], Sequence[int]] | None = None,
    density: float = DEFAULT_DENSITY,
) -> dict[str, Any]:
    """Write scenes ``start .. start+count-1`` of seed ``seed``, ``height`` x ``width``, under
    ``destination`` (a folder or any fsspec URI) as PNGs (``fmt="jpeg"``: JPEGs of
    ``quality``, named ``.jpg``) plus ``annotations.json`` (COCO instances naming those files)
    beside them. ``seams=(seams_x, seams_y)`` writes seam scenes across those lines instead
    (``density`` is then unused). Returns the annotations. One scene is in memory at a
    time; the annotations stay."""
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unknown image format {fmt!r}: png or jpeg")
    fs, root = fs_root(destination)
    fs.makedirs(root, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, index in enumerate(range(start, start + count), 1):
        if seams is None:
            scene = generate_scene(seed, index, height, width, density)
        else:
            scene = seam_scene(seed, index, height, width, seams[0], seams[1])
        fs.pipe_file(f"{root}/{scene.file_name_as(fmt)}", scene.encoded(fmt, quality))
        images.append(coco_scene_image_entry(scene, image_id, fmt))
        annotations.extend(coco_scene_annotations(scene, image_id, len(annotations) + 1))
        del scene
    coco: dict[str, Any] = {
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    fs.pipe_file(f"{root}/annotations.json", json.dumps(coco).encode("utf-8"))
    return coco


@dataclass(frozen=True)
class _Placement:
    """A painted shape's parameters and its bounding window's place and shape."""

    category: str
    cx: float
    cy: float
    size: float
    angle: float
    colour: tuple[int, int, int]
    x0: int
    y0: int
    shape: tuple[int, ...]  # (h, w) of the window


def _check_canvas(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, not {value!r}")
        if value < MIN_SIDE:
            raise ValueError(f"{name} must be at least {MIN_SIDE} pixels, not {value}")


def _reach(size: float) -> float:
    """A bound on the distance from a shape's centre to its pixels: the circumradius of a
    square of side ``size`` (the largest of the three) plus a pixel."""
    return size / math.sqrt(2) + 1


def _window_mask(
    category: str, cx: float, cy: float, size: float, angle: float, height: int, width: int
) -> tuple[np.ndarray, int, int]:
    """The pixel-centre test of a shape over its bounding window (clipped to the canvas), and
    the window's top-left ``(x, y)``."""
    reach = _reach(size)
    x0, x1 = max(0, math.floor(cx - reach)), min(width, math.ceil(cx + reach))
    y0, y1 = max(0, math.floor(cy - reach)), min(height, math.ceil(cy + reach))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return _shape_mask(category, xs, ys, cx, cy, size, angle), x0, y0


def _visible_shape(p: _Placement, mine: np.ndarray, pixels: np.ndarray) -> SceneShape:
    """Paint ``mine`` (bool over ``p``'s window: the shape's visible pixels) in ``p``'s
    colour, and the shape with its window cropped to those pixels."""
    h, w = p.shape
    pixels[p.y0 : p.y0 + h, p.x0 : p.x0 + w][mine] = p.colour
    rows, cols = np.flatnonzero(mine.any(axis=1)), np.flatnonzero(mine.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    window = np.ascontiguousarray(mine[r0:r1, c0:c1])
    return SceneShape(
        p.category, window, (p.x0 + c0, p.y0 + r0), p.colour, (p.cx, p.cy), p.size, p.angle
    )


def _paint_background(
    rng: np.random.Generator, seed: int, index: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The shapes dataset's textured background over ``height`` x ``width``, painted a band
    of rows at a time, and its mean colour (float64 (3,))."""
    # The texture's parameters by the shapes dataset's own draws, on a stand-in small enough
    # to cost nothing; only the blotches' coarse grid depends on the canvas's size.
    _, _, texture = _background(rng, 16, 16)
    if texture.coarse is not None:
        texture = replace(texture, coarse=rng.normal(0, 1, (height // 16 + 2, width // 16 + 2, 3)))
    noise_rng = np.random.default_rng([seed, index, height, width, 1])
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    total = np.zeros(3, dtype=np.int64)
    band = max(1, _BAND_PIXELS // width)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        pixels[y0:y1] = _texture_band(texture, y0, y1, width, 1, height, width, noise_rng)
        total += pixels[y0:y1].reshape(-1, 3).sum(axis=0, dtype=np.int64)
    return pixels, total / (height * width)
