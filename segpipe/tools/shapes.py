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
tests and the demo hold out other seeds). Save as PNG to keep the pixels exact (JPEG, for
photo-like inputs, changes the pixels but not the ground truth).

``scale=k`` (an integer >= 1) gives the same scene at ``k`` times the width and height, a
photo-sized image of what the model sees at scale 1 after a resize: the scene is decided at
scale 1 (the same random stream, the same visibility checks) and its recorded parameters are
painted at ``k`` times the size. The shapes keep their category, colour and paint order, their
centres and sizes are multiplied by ``k``; the background's gradient, stripe period, check
cell and blotch size are multiplied by ``k``; the per-pixel noise keeps its amplitude and comes
from its own stream, ``numpy.random.default_rng([seed, index, k])``. The ground truth is
exact at every scale by the same rule (pixel centres inside a shape, minus later shapes), so
a mask at scale ``k`` is its scale-1 mask upsampled up to the pixels along its edges (a
sliver or a triangle's tip narrower than a pixel at scale 1 may show at scale ``k``). Each
shape keeps ``k * k`` times its scale-1 pixels, within about 1 %, and so about its visible
fraction (the checks are not repeated at ``k``). Scale 1 is what the generator always made.
At scale ``k`` the background is painted a band of rows at a time (float32) and each shape
in its bounding window, so memory stays near the uint8 image, an int16 owner map and the
bool masks.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

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
_NOISE_SIGMA = 6.0  # per-pixel background noise, in RGB levels, at every scale
_BAND_PIXELS = 1 << 20  # pixels a band of rows holds when painting a scaled background
ImageFormat = Literal["png", "jpeg"]
_EXTENSIONS: dict[str, str] = {"png": ".png", "jpeg": ".jpg"}


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
    scale: int = 1

    @property
    def file_name(self) -> str:
        return self.file_name_as("png")

    def file_name_as(self, fmt: ImageFormat) -> str:
        """``shapes_s{seed}_{index:06d}.png``; ``_x{scale}`` before the extension above scale
        1; ``.jpg`` for JPEG."""
        suffix = f"_x{self.scale}" if self.scale != 1 else ""
        return f"shapes_s{self.seed}_{self.index:06d}{suffix}{_EXTENSIONS[fmt]}"

    def png(self) -> bytes:
        return self.encoded("png")

    def encoded(self, fmt: ImageFormat = "png", quality: int = 92) -> bytes:
        """The image as PNG (lossless) or as baseline JPEG of ``quality`` (4:2:0, like a
        camera's)."""
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(self.pixels).save(buf, format="PNG")
        elif fmt == "jpeg":
            Image.fromarray(self.pixels).save(buf, format="JPEG", quality=quality)
        else:
            raise ValueError(f"unknown image format {fmt!r}: png or jpeg")
        return buf.getvalue()


@dataclass(frozen=True)
class _Texture:
    """The background's parameters, in scale-1 pixel units."""

    base: np.ndarray  # (3,) mean colour before texture
    gradient_dir: float
    gradient: np.ndarray  # (3,) colour change across the ramp
    kind: int  # 0 stripes, 1 checks, 2 blotches
    amplitude: np.ndarray  # (3,)
    period: float = 0.0  # stripes
    stripe_angle: float = 0.0  # stripes
    cell: float = 0.0  # checks
    coarse: np.ndarray | None = None  # blotches: one normal value per 16x16 block


@dataclass(frozen=True)
class _Placed:
    """A painted shape's parameters, in scale-1 pixel units."""

    category: str
    cx: float
    cy: float
    size: float
    angle: float
    colour: tuple[int, int, int]


def generate_image(seed: int, index: int, scale: int = 1) -> ShapesImage:
    """Image ``index`` of the dataset with seed ``seed``, at ``scale`` times its size (the
    same scene; see the module docstring)."""
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, not {scale!r}")
    image, texture, placed = _scene(seed, index)
    if scale == 1:
        return image
    height, width = image.pixels.shape[:2]
    return _paint_scaled(seed, index, int(scale), height, width, texture, placed)


def _scene(seed: int, index: int) -> tuple[ShapesImage, _Texture, list[_Placed]]:
    """The scale-1 image, and the parameters of its background and painted shapes."""
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(MIN_SHORT_SIDE, MAX_SHORT_SIDE + 1))
    aspect = math.exp(rng.uniform(math.log(MIN_ASPECT), math.log(MAX_ASPECT)))
    if aspect >= 1:
        height, width = short, round(short * aspect)
    else:
        height, width = round(short / aspect), short
    pixels, mean, texture = _background(rng, height, width)
    # Pixel centres, used by every shape test so that the masks are exact.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    painted: list[tuple[str, np.ndarray, tuple[int, int, int]]] = []
    placed: list[_Placed] = []
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
        placed.append(_Placed(category, cx, cy, size, angle, colour))
    shapes = []
    for k, (category, _, colour) in enumerate(painted):
        visible = owner == k
        pixels[visible] = colour
        shapes.append(Shape(category, visible, colour))
    return ShapesImage(seed, index, pixels, tuple(shapes)), texture, placed


def _paint_scaled(
    seed: int,
    index: int,
    scale: int,
    height: int,
    width: int,
    texture: _Texture,
    placed: list[_Placed],
) -> ShapesImage:
    """The recorded scene painted at ``scale`` times ``height`` x ``width``."""
    big_h, big_w = height * scale, width * scale
    pixels = np.empty((big_h, big_w, 3), dtype=np.uint8)
    noise_rng = np.random.default_rng([seed, index, scale])
    band = max(1, _BAND_PIXELS // big_w)
    for y0 in range(0, big_h, band):
        y1 = min(big_h, y0 + band)
        pixels[y0:y1] = _texture_band(texture, y0, y1, big_w, scale, height, width, noise_rng)
    # Each shape's pixel-centre test in its bounding window (circumradius <= 0.71 size).
    owner = np.full((big_h, big_w), -1, dtype=np.int16)
    for k, p in enumerate(placed):
        cx, cy, size = p.cx * scale, p.cy * scale, p.size * scale
        reach = 0.75 * size + 1
        x0, x1 = max(0, math.floor(cx - reach)), min(big_w, math.ceil(cx + reach))
        y0, y1 = max(0, math.floor(cy - reach)), min(big_h, math.ceil(cy + reach))
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        full = _shape_mask(p.category, xs, ys, cx, cy, size, p.angle)
        del xs, ys
        owner[y0:y1, x0:x1][full] = k
        del full
    shapes = []
    for k, p in enumerate(placed):
        visible = owner == k
        pixels[visible] = p.colour
        shapes.append(Shape(p.category, visible, p.colour))
    return ShapesImage(seed, index, pixels, tuple(shapes), scale)


def _texture_band(
    texture: _Texture,
    y0: int,
    y1: int,
    big_w: int,
    scale: int,
    height: int,
    width: int,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Rows ``y0:y1`` of the background at ``scale``, uint8 (y1 - y0, big_w, 3). Pixel ``j``
    samples the scale-1 texture at ``j / scale`` (scale 1 samples it at whole pixels), in
    float32."""
    ys = (np.arange(y0, y1, dtype=np.float32) / np.float32(scale))[:, None]
    xs = (np.arange(big_w, dtype=np.float32) / np.float32(scale))[None, :]
    t = texture
    band = noise_rng.standard_normal((y1 - y0, big_w, 3), dtype=np.float32)
    band *= np.float32(_NOISE_SIGMA)
    band += t.base.astype(np.float32)
    cos, sin = np.float32(math.cos(t.gradient_dir)), np.float32(math.sin(t.gradient_dir))
    ramp = cos * xs / np.float32(width) + sin * ys / np.float32(height)
    band += ramp[..., None] * t.gradient.astype(np.float32)
    del ramp
    amplitude = t.amplitude.astype(np.float32)
    if t.coarse is not None:  # blotches: whole scaled 16-pixel blocks, the scale-1 blocks
        block = 16 * scale
        coarse = t.coarse.astype(np.float32) * amplitude
        band += coarse[np.arange(y0, y1) // block][:, np.arange(big_w) // block]
        return _to_uint8(band)
    if t.kind == 0:  # stripes
        cos, sin = np.float32(math.cos(t.stripe_angle)), np.float32(math.sin(t.stripe_angle))
        phase = (cos * xs + sin * ys) / np.float32(t.period)
        pattern = np.sign(np.sin(np.float32(2 * math.pi) * phase))
    else:  # checks
        cell = np.float32(t.cell)
        pattern = ((xs // cell + ys // cell) % 2) * 2 - 1
    band += pattern.astype(np.float32)[..., None] * amplitude
    return _to_uint8(band)


def _to_uint8(band: np.ndarray) -> np.ndarray:
    np.clip(band, 0, 255, out=band)
    return band.astype(np.uint8)


def generate(seed: int, count: int, start: int = 0, scale: int = 1) -> Iterator[ShapesImage]:
    for index in range(start, start + count):
        yield generate_image(seed, index, scale)


def coco_categories() -> list[dict[str, object]]:
    return [
        {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES, 1)
    ]


def coco_image_entry(
    image: ShapesImage, image_id: int, fmt: ImageFormat = "png"
) -> dict[str, object]:
    height, width = image.pixels.shape[:2]
    file_name = image.file_name_as(fmt)
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


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


def write_dataset(
    destination: str,
    seed: int,
    count: int,
    start: int = 0,
    scale: int = 1,
    fmt: ImageFormat = "png",
    quality: int = 92,
) -> dict[str, Any]:
    """Write images ``start .. start+count-1`` of seed ``seed`` at ``scale`` under
    ``destination`` (a folder or any fsspec URI) as PNGs (``fmt="jpeg"``: JPEGs of
    ``quality``, named ``.jpg``) plus ``annotations.json`` (COCO instances, naming those
    files) beside them. Returns the annotations. Images are written one by one; only the
    annotations stay in memory."""
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unknown image format {fmt!r}: png or jpeg")
    fs, root = fs_root(destination)
    fs.makedirs(root, exist_ok=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for image_id, image in enumerate(generate(seed, count, start, scale), 1):
        fs.pipe_file(f"{root}/{image.file_name_as(fmt)}", image.encoded(fmt, quality))
        images.append(coco_image_entry(image, image_id, fmt))
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


def _background(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, _Texture]:
    """A textured background (gradient, one of stripes / checks / blotches, pixel noise), its
    mean colour and its parameters (the scale-1 procedure: its draws decide the scene)."""
    base = rng.uniform(30, 225, 3)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient_dir = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(gradient_dir) * xs / width + np.sin(gradient_dir) * ys / height)[..., None]
    gradient = rng.uniform(-40, 40, 3)
    texture = ramp * gradient
    kind = int(rng.integers(3))
    amplitude = rng.uniform(8, 30, 3)
    params = _Texture(base, float(gradient_dir), gradient, kind, amplitude)
    if kind == 0:  # stripes at an angle
        period = rng.uniform(6, 30)
        a = rng.uniform(0, math.pi)
        phase = (np.cos(a) * xs + np.sin(a) * ys) / period
        texture = texture + np.sign(np.sin(2 * math.pi * phase))[..., None] * amplitude
        params = replace(params, period=float(period), stripe_angle=float(a))
    elif kind == 1:  # checks
        cell = rng.uniform(8, 32)
        checks = ((xs // cell + ys // cell) % 2) * 2 - 1
        texture = texture + checks[..., None] * amplitude
        params = replace(params, cell=float(cell))
    else:  # smooth blotches: upsampled coarse noise
        coarse = rng.normal(0, 1, (height // 16 + 2, width // 16 + 2, 3))
        blotches = coarse[(ys // 16).astype(int), (xs // 16).astype(int)]
        texture = texture + blotches * amplitude
        params = replace(params, coarse=coarse)
    noise = rng.normal(0, _NOISE_SIGMA, (height, width, 3))
    pixels = np.clip(base + texture + noise, 0, 255).astype(np.uint8)
    return pixels, pixels.reshape(-1, 3).mean(axis=0), params


def _fill_colour(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if float(np.linalg.norm(colour - background_mean)) >= _MIN_COLOUR_DISTANCE:
            break
    return (int(colour[0]), int(colour[1]), int(colour[2]))
