"""A corpus of awkward inputs, made by the tests: what each file is and what it must become.

``awkward_files()`` yields ``(name, bytes, expected)``: ``expected`` is ``None`` for files that
must decode (status ``ok``), else ``(error_code, words)``: the ``error_code`` the images row
must carry and words its message must contain (the cause, named). Two entries are not bad
bytes but bad access: ``forbidden`` (the object store denies reading it) and ``vanishing``
(deleted between listing and reading); the fault proxy plays those parts.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from segpipe.tools.shapes import generate_image

Expected = tuple[str, tuple[str, ...]] | None


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` over a tiny stub of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    body += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    return b"\x89PNG\r\n\x1a\n" + body


def shapes_image(index: int) -> Image.Image:
    return Image.fromarray(generate_image(seed=7, index=index).pixels)


def awkward_files() -> Iterator[tuple[str, bytes, Expected]]:
    jpeg = encoded(shapes_image(100), "JPEG", quality=90)
    png = encoded(shapes_image(101), "PNG")
    yield "zero-bytes.jpg", b"", ("empty", ("0 bytes",))
    yield "truncated.jpg", jpeg[: len(jpeg) // 3], ("truncated", ("truncated",))
    yield "truncated.png", png[: len(png) // 3], ("truncated", ("truncated",))
    yield "text.jpg", b"just some notes, not pixels\n" * 20, ("not_an_image", ("plain text",))
    html = b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>"
    yield "error-page.jpg", html, ("not_an_image", ("HTML",))
    huge = png_header_claiming(20000, 20000)
    yield "huge-20000x20000.png", huge, ("too_large", ("too large", "400000000 pixels"))
    yield "forbidden.jpg", jpeg, ("permission_denied", ("access denied",))
    yield "vanishing.jpg", jpeg, ("not_found", ("not found",))

    rgb = shapes_image(102)
    yield "one-pixel.png", encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), None
    yield "thin-10000x10.png", encoded(Image.new("RGB", (10000, 10), (200, 10, 10)), "PNG"), None
    values = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    yield "sixteen-bit.png", encoded(Image.fromarray(values), "PNG"), None
    yield "cmyk.jpg", encoded(rgb.convert("CMYK"), "JPEG", quality=92), None
    yield "grayscale.jpg", encoded(rgb.convert("L"), "JPEG", quality=92), None
    yield "palette.gif", encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), None
    yield "rgba.png", encoded(rgb.convert("RGBA"), "PNG"), None
    yield "image.webp", encoded(rgb, "WEBP", quality=90), None
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    yield "exif-rotated.jpg", encoded(rgb, "JPEG", quality=92, exif=exif.tobytes()), None


def good_files(count: int, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """Generated shapes images (each holds 1-6 shapes the shipped model finds)."""
    for i in range(start, start + count):
        image = generate_image(seed=7, index=i)
        if i % 2:
            yield f"good-{i:04d}.jpg", encoded(Image.fromarray(image.pixels), "JPEG", quality=92)
        else:
            yield f"good-{i:04d}.png", image.png()
