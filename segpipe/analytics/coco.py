"""One detection as a COCO result, the dict pycocotools' ``loadRes`` and other COCO tools read.

Built here only, for ``segpipe export`` (:mod:`segpipe.analytics.export`) and ``segpipe eval``
(:mod:`segpipe.analytics.evaluation`), so that both hand COCO the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def coco_result(
    image_id: int,
    category_id: int,
    box: Sequence[float],
    score: float,
    image_size: tuple[int, int],
    counts: str,
    score_digits: int | None = None,
) -> dict[str, Any]:
    """``{"image_id", "category_id", "bbox", "score", "segmentation"}`` for one detection.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels of the image (x1/y1 exclusive, as stored in
    ``box_x0..box_y1``); ``bbox`` is COCO's ``[x, y, width, height]`` = ``[x0, y0, x1 - x0,
    y1 - y0]``, computed in double precision (the same continuous pixel coordinates
    pycocotools uses for boxes computed from masks). ``image_size`` is ``(height, width)``
    and ``counts`` the mask's compressed RLE string, as stored in ``mask_rle``. The score is
    rounded to ``score_digits`` decimals if given, else kept as is.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    height, width = image_size
    return {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "score": float(score) if score_digits is None else round(float(score), score_digits),
        "segmentation": {"size": [int(height), int(width)], "counts": counts},
    }
