"""Bytes -> RGB pixels, or an error record that says why not.

Contract of :func:`decode_image`:

- Output pixels are ``numpy.uint8`` of shape ``(height, width, 3)``, C-contiguous, RGB.
- EXIF orientation is applied: the array is the image as a viewer displays it, and every
  coordinate segpipe writes refers to this upright image.
- Colour handling: grayscale, bilevel and palette images are expanded to RGB; CMYK and other
  colour spaces are converted by Pillow (no ICC colour management); images with an alpha
  channel (RGBA, LA, palette with transparency) are composited over white; 16-bit images are
  scaled to 8 bits by keeping the high byte (``value >> 8``); 32-bit float images are taken to
  lie in 0..1. Multi-frame files (GIF, TIFF, WebP) yield their first frame.
- Images with more than ``max_pixels`` pixels are refused from their header, before their
  pixels are decoded (decompression bombs).
- It never raises for bad input: every failure is a :class:`segpipe.schema.Failure` with
  an error code and a message naming the cause.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segpipe.config import DEFAULT_MAX_PIXELS
from segpipe.schema import CORRUPT, EMPTY, NOT_AN_IMAGE, TOO_LARGE, TRUNCATED, Failure


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image: ``pixels`` is uint8 ``(height, width, 3)``."""

    pixels: np.ndarray

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage | Failure:
    """Decode encoded image bytes (JPEG, PNG, GIF, WebP, TIFF, BMP, ...) to upright RGB."""
    if len(data) == 0:
        return Failure(EMPTY, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the authority; silence Pillow's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Failure(NOT_AN_IMAGE, f"not an image: {_describe_non_image(data)}")
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires at open() for images over twice its MAX_IMAGE_PIXELS.
        return Failure(TOO_LARGE, f"image too large, refused before decoding: {exc}")
    except Exception as exc:  # Pillow raises many types for malformed headers
        return Failure(CORRUPT, f"unreadable image header: {_exc_text(exc)}")

    width, height = image.size
    if width * height > max_pixels:
        return Failure(
            TOO_LARGE,
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels (max_pixels); refused before decoding",
            width=width,
            height=height,
        )
    if width <= 0 or height <= 0:
        return Failure(CORRUPT, f"image header declares an empty size {width}x{height}")

    try:
        image.load()
        pixels = _to_rgb(ImageOps.exif_transpose(image))
    except Exception as exc:
        text = _exc_text(exc)
        code = TRUNCATED if "truncat" in text.lower() else CORRUPT
        fmt = image.format or "image"
        return Failure(code, f"{fmt} data is {code}: {text}", width=width, height=height)
    return DecodedImage(np.ascontiguousarray(pixels))


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
