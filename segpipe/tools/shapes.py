"""The shapes dataset: synthetic images with exact instance ground truth.

Each image holds one to six filled shapes of three classes, ``circle``, ``square`` and
``triangle`` (squares and equilateral triangles at any rotation), in random sizes and
colours, overlapping one another, on a textured background; image sizes and aspect ratios
vary. Shapes are painted without anti-aliasing, so every pixel belongs to exactly one shape
or to the background, and the ground truth is exact:

- a shape's mask is the set of pixels whose *centre* lies inside it, minus the pixels of
  shapes painted after it (the visible part; COCO annotations describe what is visible);
- every annotated shape keeps at least ``MIN_VISIBLE`` of its own area and ``MIN_PIXELS``
  pixels, so none is hidden behind others;
- annotations are COCO instances: compressed RLE ``segmentation``, ``bbox`` ``[x, y, w, h]``
  and ``area`` computed from that RLE by pycocotools, category ids 1..3 in the order of
  :data:`CATEGORIES`.

Image ``index`` of seed ``seed`` depends on nothing else (its random stream is
``numpy.random.default_rng([seed, index])``), so any slice of a dataset can be regenerated
alone and two seeds give disjoint, independent datasets (the training set uses seed 0; the
tests and the demo hold out other seeds). Save as PNG to keep the pixels exact.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.io import fs_root

CATEGORIES = ("circle", "square", "triangle")
MIN_SHORT_SIDE, MAX_SHORT_SIDE = 160, 320
MIN_ASPECT, MAX_ASPECT = 0.6, 1.8  # width / height
MAX_SHAPES = 6
MIN_VISIBLE = 0.5  # fraction of a shape's own area that must stay visible
MIN_PIXELS = 120
_MIN_COLOUR_DISTANCE = 90.0  # RGB distance between a shape's fill and the background mean


@dataclass(frozen=True)
class Shape:
    category: str
    mask: np.ndarray  # bool (H, W): the visible pixels
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class ShapesImage:
    seed: int
    index: int
    pixels: np.ndarray  # uint8 (H, W, 3)
    shapes: tuple[Shape, ...]

    @property
    def file_name(self) -> str:
        return f"shapes_s{self.seed}_{self.index:06d}.png"

    def png(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format="PNG")
        return buf.getvalue()


def generate_image(seed: int, index: int) -> ShapesImage:
    """Image ``index`` of the dataset with seed ``seed``."""
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(MIN_SHORT_SIDE, MAX_SHORT_SIDE + 1))
    aspect = math.exp(rng.uniform(math.log(MIN_ASPECT), math.log(MAX_ASPECT)))
    if aspect >= 1:
        height, width = short, round(short * aspect)
    else:
        height, width = round(short / aspect), short
    pixels, mean = _background(rng, height, width)
    # Pixel centres, used by every shape test so that the masks are exact.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    painted: list[tuple[str, np.ndarray, tuple[int, int, int]]] = []
    owner = np.full((height, width), -1, dtype=np.int16)
    wanted = int(rng.integers(1, MAX_SHAPES + 1))
    attempts = 0
    while len(painted) < wanted and attempts < 50:
        attempts += 1
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        size = rng.uniform(0.18, 0.45) * min(height, width)
        cx = rng.uniform(0.1, 0.9) * width
        cy = rng.uniform(0.1, 0.9) * height
        angle = rng.uniform(0, 2 * math.pi)
        full = _shape_mask(category, xs, ys, cx, cy, size, angle)
        area = int(full.sum())
        if area < MIN_PIXELS:
            continue
        # Painting this shape must leave every earlier one visible enough.
        trial = owner.copy()
        trial[full] = len(painted)
        if not all(
            _visible_enough(int((trial == k).sum()), int(m.sum()))
            for k, (_, m, _) in enumerate(painted)
        ):
            continue
        colour = _fill_colour(rng, mean)
        owner = trial
        painted.append((category, full, colour))
    shapes = []
    for k, (category, _, colour) in enumerate(painted):
        visible = owner == k
        pixels[visible] = colour
        shapes.append(Shape(category, visible, colour))
    return ShapesImage(seed, index, pixels, tuple(shapes))


def generate(seed: int, count: int, start: int = 0) -> Iterator[ShapesImage]:
    for index in range(start, start + count):
        yield generate_image(seed, index)


def coco_categories() -> list[dict[str, object]]:
    return [
        {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES, 1)
    ]


def coco_image_entry(image: ShapesImage, image_id: int) -> dict[str, object]:
    height, width = image.pixels.shape[:2]
    return {"id": image_id, "file_name": image.file_name, "width": width, "height": height}


def coco_annotation_entries(
    image: ShapesImage, image_id: int, first_annotation_id: int
) -> list[dict[str, object]]:
    entries = []
    for k, shape in enumerate(image.shapes):
        rle = mask_utils.encode(np.asfortranarray(shape.mask, dtype=np.uint8))
        entries.append(
            {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": CATEGORIES.index(shape.category) + 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return entries


def write_dataset(destination: str, seed: int, count: int, start: int = 0) -> dict[str, Any]:
    """Write images ``start .. start+count-1`` of seed ``seed`` as PNGs under ``destination``
    (a folder or any fsspec URI) plus ``annotations.json`` (COCO instances) beside them.
    Returns the annotations. Images are written one by one; only the annotations stay in
    memory."""
    fs, root = fs_root(destination)
    fs.makedirs(root, exist_ok=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id, image in enumerate(generate(seed, count, start), 1):
        fs.pipe_file(f"{root}/{image.file_name}", image.png())
        images.append(coco_image_entry(image, image_id))
        annotations.extend(coco_annotation_entries(image, image_id, len(annotations) + 1))
    coco: dict[str, Any] = {
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    fs.pipe_file(f"{root}/annotations.json", json.dumps(coco).encode("utf-8"))
    return coco


def _visible_enough(visible: int, full: int) -> bool:
    return visible >= MIN_PIXELS and visible >= MIN_VISIBLE * full


def _shape_mask(
    category: str,
    xs: np.ndarray,
    ys: np.ndarray,
    cx: float,
    cy: float,
    size: float,
    angle: float,
) -> np.ndarray:
    """Pixels whose centre lies inside the shape. ``size`` is the diameter of a circle and
    the side of a square or triangle; ``angle`` rotates squares and triangles."""
    dx, dy = xs - cx, ys - cy
    if category == "circle":
        return np.asarray(dx * dx + dy * dy <= (size / 2) ** 2)
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's frame
    if category == "square":
        half = size / 2
        return np.asarray((np.abs(u) <= half) & (np.abs(v) <= half))
    # Equilateral triangle centred on its centroid: inside all three edges' half-planes.
    inradius = size / (2 * math.sqrt(3))
    inside = np.ones(xs.shape, dtype=bool)
    for k in range(3):
        theta = math.pi / 2 + k * 2 * math.pi / 3  # outward normals of the three edges
        inside &= u * math.cos(theta) + v * math.sin(theta) <= inradius
    return inside


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background (gradient, one of stripes / checks / blotches, pixel noise) and
    its mean colour."""
    base = rng.uniform(30, 225, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient_dir = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(gradient_dir) * xs / width + np.sin(gradient_dir) * ys / height)[..., None]
    texture = ramp * rng.uniform(-40, 40, 3)
    kind = int(rng.integers(3))
    amplitude = rng.uniform(8, 30, 3)
    if kind == 0:  # stripes at an angle
        period = rng.uniform(6, 30)
        a = rng.uniform(0, math.pi)
        phase = (np.cos(a) * xs + np.sin(a) * ys) / period
        texture = texture + np.sign(np.sin(2 * math.pi * phase))[..., None] * amplitude
    elif kind == 1:  # checks
        cell = rng.uniform(8, 32)
        checks = ((xs // cell + ys // cell) % 2) * 2 - 1
        texture = texture + checks[..., None] * amplitude
    else:  # smooth blotches: upsampled coarse noise
        coarse = rng.normal(0, 1, (height // 16 + 2, width // 16 + 2, 3))
        blotches = coarse[(ys // 16).astype(int), (xs // 16).astype(int)]
        texture = texture + blotches * amplitude
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(base + texture + noise, 0, 255).astype(np.uint8)
    return pixels, pixels.reshape(-1, 3).mean(axis=0)


def _fill_colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if float(np.linalg.norm(colour - background_mean)) >= _MIN_COLOUR_DISTANCE:
            break
    return (int(colour[0]), int(colour[1]), int(colour[2]))
