"""`segpipe render`: overlays drawn where the masks are, and a gallery a real browser loads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.analytics.render import class_colour
from segpipe.cli import main
from segpipe.tools.shapes import generate, write_dataset
from tests.browser import loaded_dom
from tests.outputs import SHAPES_LABELS, ground_truth_detections, write_output

SEED, COUNT = 9, 8


@pytest.fixture
def output(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_dataset(str(images), seed=SEED, count=COUNT)
    rows = [
        (
            (images / image.file_name).as_uri(),
            (image.pixels.shape[1], image.pixels.shape[0]),
            ground_truth_detections(image),
        )
        for image in generate(SEED, COUNT)
    ]
    write_output(str(tmp_path / "out"), "shapes-gt", rows, SHAPES_LABELS)
    return tmp_path / "out", images


def test_overlays_paint_the_masks(output: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = output
    gallery = tmp_path / "gallery"
    assert main(["render", "--output", str(out), "--to", str(gallery), "--limit", "3"]) == 0
    pngs = sorted(gallery.glob("*.png"))
    assert len(pngs) == 3 and (gallery / "index.html").exists()
    by_name = {image.file_name: image for image in generate(SEED, COUNT)}
    page = (gallery / "index.html").read_text()
    for png in pngs:
        file_name = re.search(rf'src="{png.name}" alt="[^"]*/([^"/]+)"', page).group(1)  # type: ignore[union-attr]
        image = by_name[file_name]
        drawn = np.asarray(Image.open(png).convert("RGB")).astype(int)
        assert drawn.shape == image.pixels.shape
        for shape in image.shapes:
            # Deep inside each mask the pixel is the shape blended with its class colour.
            inner = _erode(shape.mask, 4)
            if not inner.any():
                continue
            colour = np.array(class_colour(shape.category))
            expected = (np.array(shape.colour) * (255 - 110) + colour * 110) / 255
            got = np.median(drawn[inner], axis=0)  # labels of other shapes may overlap
            assert np.abs(got - expected).max() < 6, (shape.category, got, expected)
        far = np.ones(image.pixels.shape[:2], dtype=bool)  # away from boxes and labels
        for shape in image.shapes:
            ys, xs = np.nonzero(shape.mask)
            far[max(0, ys.min() - 20) : ys.max() + 4, max(0, xs.min() - 4) : xs.max() + 90] = False
        assert far.sum() > 0.1 * far.size or len(image.shapes) > 2
        assert np.array_equal(drawn[far], image.pixels[far].astype(int))


def test_where_limit_and_missing_images(output: tuple[Path, Path], tmp_path: Path) -> None:
    out, images = output
    gallery = tmp_path / "g"
    args = ["render", "--output", str(out), "--to", str(gallery)]
    assert main([*args, "--where", "label = 'triangle'", "--limit", "100"]) == 0
    page = (gallery / "index.html").read_text()
    with_triangles = [
        i for i in generate(SEED, COUNT) if any(s.category == "triangle" for s in i.shapes)
    ]
    assert page.count("<figure>") == len(with_triangles)
    assert "label = &#x27;triangle&#x27;" in page and "<td>triangle</td>" not in page
    assert re.search(r"triangle</td><td>\d+</td>", page)
    assert "circle</td>" not in page  # counts follow the selection
    # An image that disappeared since the run is listed, not drawn.
    next(images.glob("*.png")).unlink()
    assert main([*args, "--limit", "100"]) == 0
    page = (gallery / "index.html").read_text()
    assert page.count('class="missing"') == 1 and page.count("<figure>") == COUNT - 1
    assert main([*args, "--where", "no_such_column = 1"]) == 2


def test_the_gallery_loads_in_chromium(output: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = output
    gallery = tmp_path / "gallery"
    assert main(["render", "--output", str(out), "--to", str(gallery)]) == 0
    dom, stderr = loaded_dom(gallery / "index.html", tmp_path / "profile")
    assert f'data-images-total="{COUNT}"' in dom, stderr
    assert f'data-images-loaded="{COUNT}"' in dom, stderr
    assert dom.count("<img") == COUNT


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    inner = mask.copy()
    for _ in range(steps):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return inner
