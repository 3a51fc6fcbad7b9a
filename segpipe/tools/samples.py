"""Generated sample images for the demo and the tests: filled shapes on noisy backgrounds.

Deterministic from a seed, varied in size and aspect ratio.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZES = ((640, 480), (480, 640), (512, 512), (800, 450), (300, 200))


def sample_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image (``size`` = width, height) with 2-5 filled circles, squares, triangles."""
    rng = np.random.default_rng(seed)
    width, height = size or SIZES[int(rng.integers(len(SIZES)))]
    base = rng.integers(40, 215, 3)
    noise = rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        r = int(rng.integers(max(4, min(width, height) // 12), max(5, min(width, height) // 4)))
        cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 1:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image
