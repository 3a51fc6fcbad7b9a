"""Bytes -> RGB pixels, or an error record that says why not.

Contract of :func:`decode_image`:

- Output pixels are ``numpy.uint8`` of shape ``(h, w, 3)``, C-contiguous, RGB.
- EXIF orientation is applied: the array is the image as a viewer displays it, and every
  coordinate segpipe writes refers to this upright image at full resolution, whose size is
  :attr:`DecodedImage.width` x :attr:`DecodedImage.height`.
- Decoding to the model's scale (``fit=(min_size, max_size)``, the model transform's
  sizes): an image larger than the model's input comes out at exactly the size the model's
  transform would resize it to (:func:`model_input_size`), so ``(h, w)`` is smaller than
  ``(height, width)``. A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at or
  above that size (Pillow's ``draft``), other formats in full and then shrunk by an integer
  box filter; a bilinear resize then sets the exact size. Images at or below the model's
  input size, and very thin ones (whose short side would go under
  :data:`MIN_FIT_SIDE`), are decoded exactly as without ``fit``. Without ``fit``,
  ``(h, w) == (height, width)``.
- Colour handling: grayscale, bilevel and palette images are expanded to RGB; CMYK and other
  colour spaces are converted by Pillow (no ICC colour management); images with an alpha
  channel (RGBA, LA, palette with transparency) are composited over white; 16-bit images are
  scaled to 8 bits by keeping the high byte (``value >> 8``); 32-bit float images are taken to
  lie in 0..1. Multi-frame files (GIF, TIFF, WebP) yield their first frame.
- Images with more than ``max_pixels`` pixels are refused from their header, before their
  pixels are decoded (decompression bombs). With tiling (:class:`segpipe.config.TileConfig`),
  an image of more than ``tile_above`` pixels is decoded at full resolution for its tiles,
  and ``tile_max_pixels`` is its limit instead.
- It never raises for bad input: every failure is a :class:`segpipe.schema.Failure` with
  an error code and a message naming the cause.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segpipe.config import DEFAULT_MAX_PIXELS, TileConfig
from segpipe.schema import CORRUPT, EMPTY, NOT_AN_IMAGE, TOO_LARGE, TRUNCATED, Failure

# Decoded at the model's scale, no side goes under this many pixels (thinner images are
# decoded in full; the model pads them).
MIN_FIT_SIDE = 8
# EXIF orientations that swap width and height (transposed, rotated by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
# Modes shrunk as decoded (resizing commutes with their conversion to RGB); the others are
# converted first (alpha composited, 16 bits cut to 8), then shrunk.
_RESIZED_AS_DECODED = ("RGB", "L")


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image: ``pixels`` is uint8 ``(h, w, 3)``; ``size`` is the upright
    image's full-resolution ``(height, width)`` when the pixels were decoded smaller (at the
    model's scale), else None (the pixels are the full image)."""

    pixels: np.ndarray
    size: tuple[int, int] | None = None

    @property
    def height(self) -> int:
        return self.size[0] if self.size else int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return self.size[1] if self.size else int(self.pixels.shape[1])


def model_input_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The ``(height, width)`` torchvision's ``GeneralizedRCNNTransform`` resizes an image of
    ``height`` x ``width`` to: scale = min(min_size / short side, max_size / long side),
    each side times the scale floored, in double precision, as the transform and
    ``torch.nn.functional.interpolate`` compute them."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fit: tuple[int, int] | None = None,
    tiling: TileConfig | None = None,
) -> DecodedImage | Failure:
    """Decode encoded image bytes (JPEG, PNG, GIF, WebP, TIFF, BMP, ...) to upright RGB;
    with ``fit=(min_size, max_size)``, a large image at the model's input size. With
    ``tiling``, an image it tiles is decoded in full (at native resolution, whatever
    ``fit``), and refused over ``tiling.tile_max_pixels`` instead of ``max_pixels``."""
    if len(data) == 0:
        return Failure(EMPTY, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the authority; silence Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(data, tiling)
    except UnidentifiedImageError:
        return Failure(NOT_AN_IMAGE, f"not an image: {_describe_non_image(data)}")
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires at open() for images over twice its MAX_IMAGE_PIXELS.
        return Failure(TOO_LARGE, f"image too large, refused before decoding: {exc}")
    except Exception as exc:  # Pillow raises many types for malformed headers
        return Failure(CORRUPT, f"unreadable image header: {_exc_text(exc)}")

    width, height = image.size
    refused = _refused_size(width, height, max_pixels, tiling)
    if refused is not None:
        return refused
    if tiling is not None and tiling.tiled(height, width):
        fit = None  # its tiles are cut at native resolution

    try:
        target = _fit_target(image, fit)
        if target is not None and image.format == "JPEG":
            image.draft(image.mode, _stored_order(image, target))
        image.load()
        # exif_transpose copies an image it leaves as it is: a second full-size copy of a
        # scene decoded in full, for nothing.
        upright = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
        if target is not None and upright.mode in _RESIZED_AS_DECODED:
            upright = _shrunk(upright, target)  # no copy of the full-size pixels
        pixels = _to_rgb(upright)
    except Exception as exc:
        text = _exc_text(exc)
        code = TRUNCATED if "truncat" in text.lower() else CORRUPT
        fmt = image.format or "image"
        return Failure(code, f"{fmt} data is {code}: {text}", width=width, height=height)
    if target is None:
        return DecodedImage(np.ascontiguousarray(pixels))
    if pixels.shape[:2] != target:  # other modes: converted to RGB first, then shrunk
        pixels = np.asarray(_shrunk(Image.fromarray(pixels), target))
    size = (width, height) if _orientation(image) in _SWAPPING_ORIENTATIONS else (height, width)
    return DecodedImage(np.ascontiguousarray(pixels), size=size)


def _refused_size(
    width: int, height: int, max_pixels: int, tiling: TileConfig | None
) -> Failure | None:
    """Why an image whose header declares ``width`` x ``height`` is refused before
    decoding: over its limit (``tile_max_pixels`` for an image ``tiling`` tiles, else
    ``max_pixels``), or empty; None if it is not."""
    limit, setting = max_pixels, "max_pixels"
    if tiling is not None and tiling.tiled(height, width):
        limit, setting = tiling.tile_max_pixels, "tile_max_pixels"
    if width * height > limit:
        return Failure(
            TOO_LARGE,
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limit} pixels ({setting}); refused before decoding",
            width=width,
            height=height,
        )
    if width <= 0 or height <= 0:
        return Failure(CORRUPT, f"image header declares an empty size {width}x{height}")
    return None


def _open(data: bytes, tiling: TileConfig | None) -> Image.Image:
    """``Image.open``; with tiling on, Pillow's own guard (an error over twice its
    ``MAX_IMAGE_PIXELS``, 179 megapixels) moved above ``tile_max_pixels``, which
    :func:`decode_image` checks itself from the header. Decoding is one image at a time in
    a task, so the module-wide setting is restored at once."""
    if tiling is None or not tiling.enabled:
        return Image.open(io.BytesIO(data))
    guard = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(guard or 0, tiling.tile_max_pixels)
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # an unreadable EXIF block: exif_transpose leaves the image as stored
        return 1


def _fit_target(image: Image.Image, fit: tuple[int, int] | None) -> tuple[int, int] | None:
    """The upright ``(h, w)`` to decode ``image`` to for a model of sizes ``fit``, or None
    to decode it whole (no ``fit``; not larger than the model's input; very thin)."""
    if fit is None:
        return None
    width, height = image.size
    if _orientation(image) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    target = model_input_size(height, width, *fit)
    if target[0] >= height or target[1] >= width or min(target) < MIN_FIT_SIDE:
        return None
    return target


def _stored_order(image: Image.Image, target: tuple[int, int]) -> tuple[int, int]:
    """``target`` (upright ``(h, w)``) as the ``(width, height)`` of the image as stored."""
    h, w = target
    return (h, w) if _orientation(image) in _SWAPPING_ORIENTATIONS else (w, h)


def _shrunk(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """``image`` shrunk to ``target`` ``(h, w)``: an integer box reduction first where it is
    at least twice as large, then bilinear (Pillow's, which filters over the whole footprint
    of each output pixel)."""
    h, w = target
    factor = min(image.width // w, image.height // h)
    if factor >= 2:
        image = image.reduce(factor)
    return image.resize((w, h), Image.Resampling.BILINEAR)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to uint8 RGB following the module's colour contract."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(image, dtype=np.int64)
        gray8 = (np.clip(gray, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        gray8 = np.clip(np.nan_to_num(gray) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip()
    lowered = head.lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered:
        return "the bytes are an HTML document (an error page saved under an image name?)"
    if lowered.startswith((b"<?xml", b"<svg")) or b"<svg" in lowered:
        return "the bytes are XML/SVG, which is not a raster image format segpipe decodes"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"the bytes are plain text, starting {head[:40]!r}"
    return f"unrecognised format, {len(data)} bytes starting {data[:8].hex()}"


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
