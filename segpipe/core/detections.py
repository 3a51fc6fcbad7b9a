"""What the model returns for one image: :class:`Detections`, each mask a window around its box.

A detection's mask travels as a *window*: the thresholded mask inside the rectangle the model
pasted it into (its box, slightly enlarged, clipped to the image), with that rectangle's
top-left corner. Nothing image-sized is made per detection: the model never pastes into a
full-resolution canvas, and the encoder (:mod:`segpipe.core.encode`) works on the window alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Detections of one image of ``image_size`` = ``(height, width)`` pixels.

    boxes: float32 (N, 4), ``x0, y0, x1, y1`` in absolute pixels of the input image.
    labels: int64 (N,), indices into the model's category names (0 is the background).
    scores: float32 (N,) in 0..1.
    masks: N bool arrays ``(h_k, w_k)``, the mask probabilities thresholded
    (> mask_threshold) inside window k; pixels outside the window are not in the mask.
    mask_origins: int32 (N, 2), window k's top-left pixel ``(x, y)``; the window lies inside
    the image: ``0 <= x``, ``x + w_k <= width``, likewise for y.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: Sequence[np.ndarray]
    mask_origins: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __post_init__(self) -> None:
        n, (height, width) = len(self), self.image_size
        if len(self.masks) != n or self.mask_origins.shape != (n, 2):
            raise ValueError(
                f"{n} detections need {n} mask windows and ({n}, 2) origins, got "
                f"{len(self.masks)} and {self.mask_origins.shape}"
            )
        for (x, y), window in zip(self.mask_origins.tolist(), self.masks, strict=True):
            h, w = window.shape
            if x < 0 or y < 0 or x + w > width or y + h > height:
                raise ValueError(
                    f"mask window {w}x{h} at ({x}, {y}) is not inside the {width}x{height} image"
                )
