"""Decoding odd inputs: each becomes an upright RGB uint8 image or a named error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe import schema
from segpipe.core.decode import DecodedImage, decode_image, model_input_size
from segpipe.schema import Failure
from tests.corpus import png_header_claiming


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient_rgb(width: int = 48, height: int = 32) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=2)


def decoded(data: bytes, **kwargs: int) -> np.ndarray:
    result = decode_image(data, **kwargs)
    assert isinstance(result, DecodedImage), result
    assert result.pixels.dtype == np.uint8 and result.pixels.ndim == 3
    assert result.pixels.shape[2] == 3 and result.pixels.flags.c_contiguous
    return result.pixels


def failed(data: bytes, code: str, **kwargs: int) -> Failure:
    result = decode_image(data, **kwargs)
    assert isinstance(result, Failure), result
    assert result.code == code, result
    assert result.message
    return result


def test_rgb_png_is_lossless() -> None:
    pixels = gradient_rgb()
    np.testing.assert_array_equal(decoded(encode(Image.fromarray(pixels), "PNG")), pixels)


def test_grayscale_is_expanded_to_three_equal_channels() -> None:
    gray = gradient_rgb()[:, :, 0]
    out = decoded(encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert out.shape == (32, 48, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_bilevel_image() -> None:
    image = Image.fromarray(np.eye(16, dtype=bool))
    out = decoded(encode(image, "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]


def test_palette_gif_and_its_first_frame() -> None:
    first = Image.new("RGB", (20, 10), (255, 0, 0)).convert("P")
    second = Image.new("RGB", (20, 10), (0, 0, 255)).convert("P")
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second])
    out = decoded(buf.getvalue())
    assert out.shape == (10, 20, 3)
    assert out[5, 5].tolist() == [255, 0, 0]


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = [10, 20, 30, 255]  # opaque left half
    rgba[:, 4:] = [10, 20, 30, 0]  # transparent right half
    out = decoded(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 7].tolist() == [255, 255, 255]


def test_palette_with_transparency_is_composited_over_white() -> None:
    image = Image.new("P", (6, 6), 0)
    image.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 3, 6))
    out = decoded(encode(image, "PNG", transparency=0))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 5].tolist() == [255, 255, 255]


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    rgb = Image.new("RGB", (32, 32), (220, 30, 40))
    out = decoded(encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert out.shape == (32, 32, 3)
    assert np.abs(out[16, 16].astype(int) - [220, 30, 40]).max() <= 12


def test_16bit_grayscale_png_keeps_the_high_byte() -> None:
    values = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = decoded(encode(image, "PNG"))
    np.testing.assert_array_equal(out[:, :, 0], (values >> 8).astype(np.uint8))


def test_webp() -> None:
    pixels = gradient_rgb()
    out = decoded(encode(Image.fromarray(pixels), "WEBP", lossless=True))
    np.testing.assert_array_equal(out, pixels)


def test_exif_orientation_is_applied() -> None:
    stored = gradient_rgb(width=40, height=20)
    stored[:4, :4] = [255, 0, 0]  # a marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    out = decoded(data)
    assert out.shape == (40, 20, 3)  # displayed: 20 wide, 40 high
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))
    assert out[0, -1].tolist() == [255, 0, 0]  # marker now at the displayed top-right


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000)])
def test_tiny_and_very_thin_images(size: tuple[int, int]) -> None:
    out = decoded(encode(Image.new("RGB", size, (1, 2, 3)), "PNG"))
    assert out.shape == (size[1], size[0], 3)


def test_empty_file() -> None:
    assert "0 bytes" in failed(b"", schema.EMPTY).message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noisy), fmt)
    err = failed(data[: len(data) // 2], schema.TRUNCATED)
    assert fmt in err.message
    assert (err.width, err.height) == (64, 64)


def test_text_with_an_image_name() -> None:
    assert "plain text" in failed(b"hello, I am not a JPEG\n", schema.NOT_AN_IMAGE).message


def test_html_error_page_saved_as_jpg() -> None:
    page = b"<!DOCTYPE html>\n<html><body><h1>403 Forbidden</h1></body></html>"
    assert "HTML" in failed(page, schema.NOT_AN_IMAGE).message


def test_random_binary_is_not_an_image() -> None:
    data = bytes(np.random.default_rng(1).integers(0, 255, 300, dtype=np.uint8))
    failed(data, schema.NOT_AN_IMAGE)


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    err = failed(data, schema.TOO_LARGE, max_pixels=50_000)
    assert "300x200" in err.message and "50000" in err.message
    assert decoded(data, max_pixels=60_000).shape == (200, 300, 3)


def test_decompression_bomb_is_refused_from_its_header() -> None:
    # 20000 x 20000 declared in 100 bytes: refused without allocating 1.2 GB of pixels.
    err = failed(png_header_claiming(20000, 20000), schema.TOO_LARGE)
    assert "400000000" in err.message and "refused before decoding" in err.message


def test_header_over_our_limit_but_under_pillows() -> None:
    err = failed(png_header_claiming(9000, 9000), schema.TOO_LARGE)
    assert "9000x9000" in err.message and "max_pixels" in err.message
    assert (err.width, err.height) == (9000, 9000)


def test_decompression_bomb_beyond_pillows_own_limit() -> None:
    err = failed(png_header_claiming(100_000, 100_000), schema.TOO_LARGE, max_pixels=10**12)
    assert "too large" in err.message


def test_every_error_code_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    decoding = readme[readme.index("Failures become rows") :][:900]
    assert [code for code in schema.ERROR_CODES if f"`{code}`" not in decoding] == []


# --- Decoding to the model's scale (fit=(min_size, max_size)) ---

FIT = (200, 333)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some detail: large images shrunk two ways must stay close."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=2) * 200
    blobs = np.sin(xs / 37.0 + rng.uniform(0, 6)) * np.cos(ys / 23.0 + rng.uniform(0, 6)) * 40
    return np.clip(base + blobs[..., None] + 20, 0, 255).astype(np.uint8)


def shrunk(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A reference: the full decode, resized by Pillow with a filter over each footprint."""
    height, width = size
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BOX))


def fitted(data: bytes, **kwargs: object) -> DecodedImage:
    result = decode_image(data, fit=FIT, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, DecodedImage), result
    assert result.pixels.dtype == np.uint8 and result.pixels.flags.c_contiguous
    return result


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (800, 450), (333, 1000), (1000, 333), (4000, 3000)]
)
def test_model_input_size_is_torchvisions(size: tuple[int, int]) -> None:
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    width, height = size
    for min_size, max_size in ((800, 1333), FIT, (256, 448)):
        transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
        images, _ = transform([torch.zeros(3, height, width)])
        expected = tuple(images.image_sizes[0])
        assert model_input_size(height, width, min_size, max_size) == expected


def test_images_at_or_below_the_model_size_are_untouched() -> None:
    for width, height in ((48, 32), (333, 200), (300, 200)):
        data = encode(Image.fromarray(photo(width, height)), "JPEG", quality=90)
        whole = decode_image(data)
        small = fitted(data)
        assert isinstance(whole, DecodedImage) and small.size is None
        np.testing.assert_array_equal(small.pixels, whole.pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_large_images_come_out_at_the_model_size_with_their_full_size(fmt: str) -> None:
    pixels = photo(1600, 1200)
    result = fitted(encode(Image.fromarray(pixels), fmt, quality=92))
    target = model_input_size(1200, 1600, *FIT)
    assert result.pixels.shape == (*target, 3) and target == (200, 266)
    assert (result.width, result.height) == (1600, 1200)
    error = np.abs(result.pixels.astype(int) - shrunk(pixels, target).astype(int)).mean()
    assert error < 3, error


def test_exif_rotation_at_the_model_size() -> None:
    stored = photo(1600, 1200)
    stored[:200, :200] = [255, 0, 0]  # a marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    result = fitted(encode(Image.fromarray(stored), "JPEG", quality=92, exif=exif.tobytes()))
    upright = np.rot90(stored, k=-1)
    assert (result.width, result.height) == (1200, 1600)
    target = model_input_size(1600, 1200, *FIT)
    assert result.pixels.shape == (*target, 3)
    error = np.abs(result.pixels.astype(int) - shrunk(upright, target).astype(int)).mean()
    assert error < 3, error
    assert result.pixels[2, -3].tolist()[0] > 200  # the marker, at the displayed top-right


@pytest.mark.parametrize("kind", ["cmyk", "16bit", "palette", "rgba", "gray"])
def test_odd_modes_at_the_model_size_match_the_full_decode(kind: str) -> None:
    pixels = photo(1500, 1000, seed=3)
    rgb = Image.fromarray(pixels)
    if kind == "cmyk":
        data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    elif kind == "16bit":
        data = encode(Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257), "PNG")
    elif kind == "palette":
        data = encode(rgb.convert("P"), "PNG", transparency=0)
    elif kind == "rgba":
        alpha = np.where(np.arange(1500)[None, :] < 750, 255, 0).astype(np.uint8)
        rgba = np.dstack([pixels, np.repeat(alpha, 1000, axis=0)])
        data = encode(Image.fromarray(rgba, mode="RGBA"), "PNG")
    else:
        data = encode(rgb.convert("L"), "PNG")
    whole = decoded(data)
    result = fitted(data)
    assert (result.width, result.height) == (1500, 1000)
    reference = shrunk(whole, result.pixels.shape[:2])
    assert np.abs(result.pixels.astype(int) - reference.astype(int)).mean() < 3


def test_every_error_is_the_same_at_the_model_size() -> None:
    data = encode(Image.fromarray(photo(1600, 1200)), "JPEG", quality=90)
    assert failed(data[: len(data) // 2], schema.TRUNCATED, fit=FIT).width == 1600
    failed(data, schema.TOO_LARGE, max_pixels=1_000_000, fit=FIT)
    failed(png_header_claiming(20000, 20000), schema.TOO_LARGE, fit=FIT)
    failed(b"", schema.EMPTY, fit=FIT)
    failed(b"<html>oops</html>", schema.NOT_AN_IMAGE, fit=FIT)


@pytest.mark.parametrize("size", [(20000, 5), (5, 20000), (10000, 10)])
def test_very_thin_images_are_decoded_whole(size: tuple[int, int]) -> None:
    result = fitted(encode(Image.new("RGB", size, (1, 2, 3)), "PNG"))
    assert result.size is None and result.pixels.shape == (size[1], size[0], 3)
