"""Functions over stored masks for SQL engines: IoU, intersection, area and box, from the RLE.

Each function takes the ``mask_rle`` column (COCO compressed RLE counts) with the height and
width of the image it was encoded at (``image_height``, ``image_width`` of the same row; two
masks compared must come from images of the same size, as two runs' rows of one image do):

- ``mask_iou(rle_a, rle_b, height, width)`` -> DOUBLE: intersection over union, 0..1
  (0 when both masks are empty);
- ``mask_intersection(rle_a, rle_b, height, width)`` -> BIGINT: pixels in both masks;
- ``mask_area(rle, height, width)`` -> BIGINT: pixels in the mask (what the column of that
  name stored when the row was written);
- ``mask_bbox(rle, height, width)`` -> STRUCT(x0, y0, x1, y1 INTEGER): the tight box of the
  mask's pixels, x1/y1 exclusive like the stored boxes; NULL for an empty mask.

A NULL argument gives NULL. Every function runs on pycocotools' run-length operations (no
mask is decoded to pixels) and is called by the engine once per Arrow batch of rows, not
once per row: :func:`register_duckdb` makes them DuckDB Arrow UDFs,
:func:`segpipe.analytics.engines.spark_functions` Spark Arrow UDFs. The arguments arrive as
Arrow arrays (DuckDB hands chunked ones, which answer the same ``len`` and ``to_pylist``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # Spark's executors import this module without DuckDB
    import duckdb

BBOX_TYPE = pa.struct([(name, pa.int32()) for name in ("x0", "y0", "x1", "y1")])


def mask_iou(a: pa.Array, b: pa.Array, height: pa.Array, width: pa.Array) -> pa.Array:
    """Row by row, the IoU of mask ``a`` and mask ``b``."""
    pairs, inter = _intersections(a, b, height, width)
    out = np.full(len(inter), np.nan)
    if pairs:
        areas = _areas([r for pair in pairs.values() for r in pair]).reshape(-1, 2)
        rows = np.fromiter(pairs.keys(), dtype=np.int64, count=len(pairs))
        union = areas.sum(axis=1) - inter[rows]
        out[rows] = np.divide(inter[rows], union, out=np.zeros(len(rows)), where=union > 0)
    return pa.array(out, type=pa.float64(), mask=np.isnan(out))


def mask_intersection(a: pa.Array, b: pa.Array, height: pa.Array, width: pa.Array) -> pa.Array:
    """Row by row, the number of pixels in both mask ``a`` and mask ``b``."""
    pairs, inter = _intersections(a, b, height, width)
    missing = np.ones(len(inter), dtype=bool)
    missing[list(pairs)] = False
    return pa.array(inter, type=pa.int64(), mask=missing)


def mask_area(rle: pa.Array, height: pa.Array, width: pa.Array) -> pa.Array:
    """Row by row, the number of pixels in the mask."""
    rows, rles = _rles(rle, height, width)
    out = np.zeros(len(rle), dtype=np.int64)
    missing = np.ones(len(rle), dtype=bool)
    if rles:
        out[rows] = _areas(rles)
        missing[rows] = False
    return pa.array(out, type=pa.int64(), mask=missing)


def mask_bbox(rle: pa.Array, height: pa.Array, width: pa.Array) -> pa.Array:
    """Row by row, the mask's tight box ``{x0, y0, x1, y1}`` (x1/y1 exclusive)."""
    rows, rles = _rles(rle, height, width)
    boxes = np.zeros((len(rle), 4), dtype=np.int32)
    missing = np.ones(len(rle), dtype=bool)
    if rles:
        xywh = np.rint(mask_utils.toBbox(rles)).astype(np.int32).reshape(-1, 4)
        boxes[rows, :2] = xywh[:, :2]
        boxes[rows, 2:] = xywh[:, :2] + xywh[:, 2:]
        missing[rows] = _areas(rles) == 0
    fields = [pa.array(boxes[:, k], type=pa.int32()) for k in range(4)]
    return pa.StructArray.from_arrays(
        fields, fields=list(BBOX_TYPE), mask=pa.array(missing, type=pa.bool_())
    )


def _areas(rles: list[dict[str, Any]]) -> np.ndarray:
    """``mask_utils.area`` in slices of 255: pycocotools 2.0.11 overflows a uint8 it builds
    from the list's length when the list is longer."""
    if not rles:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(
        [mask_utils.area(rles[k : k + 255]) for k in range(0, len(rles), 255)]
    ).astype(np.int64)


def _rles(
    rle: pa.Array, height: pa.Array, width: pa.Array
) -> tuple[list[int], list[dict[str, Any]]]:
    """The rows without a NULL argument, and their masks as pycocotools RLE objects."""
    rows, rles = [], []
    for k, (counts, h, w) in enumerate(
        zip(rle.to_pylist(), height.to_pylist(), width.to_pylist(), strict=True)
    ):
        if counts is not None and h is not None and w is not None:
            rows.append(k)
            rles.append({"size": [int(h), int(w)], "counts": counts.encode("ascii")})
    return rows, rles


def _intersections(
    a: pa.Array, b: pa.Array, height: pa.Array, width: pa.Array
) -> tuple[dict[int, tuple[dict[str, Any], dict[str, Any]]], np.ndarray]:
    """The rows without a NULL argument with their two RLE objects, and the pixels the two
    masks share in each row (0 where an argument is NULL)."""
    rows_a, rles_a = _rles(a, height, width)
    rows_b, rles_b = _rles(b, height, width)
    by_row = dict(zip(rows_b, rles_b, strict=True))
    pairs = {k: (ra, by_row[k]) for k, ra in zip(rows_a, rles_a, strict=True) if k in by_row}
    inter = np.zeros(len(a), dtype=np.int64)
    for k, (ra, rb) in pairs.items():
        inter[k] = int(mask_utils.area(mask_utils.merge([ra, rb], intersect=True)))
    return pairs, inter


# name -> (function, argument count, DuckDB return type, Spark return type)
FUNCTIONS: dict[str, tuple[Callable[..., pa.Array], int, str, str]] = {
    "mask_iou": (mask_iou, 4, "DOUBLE", "double"),
    "mask_intersection": (mask_intersection, 4, "BIGINT", "bigint"),
    "mask_area": (mask_area, 3, "BIGINT", "bigint"),
    "mask_bbox": (
        mask_bbox,
        3,
        "STRUCT(x0 INTEGER, y0 INTEGER, x1 INTEGER, y1 INTEGER)",
        "struct<x0:int,y0:int,x1:int,y1:int>",
    ),
}
# The arguments' types: the RLE strings, then the image's height and width.
_ARGUMENTS: dict[int, list[Any]] = {
    3: ["VARCHAR", "BIGINT", "BIGINT"],
    4: ["VARCHAR", "VARCHAR", "BIGINT", "BIGINT"],
}


def register_duckdb(
    con: duckdb.DuckDBPyConnection, names: Sequence[str] = tuple(FUNCTIONS)
) -> None:
    """Define the functions on ``con`` as Arrow UDFs (one call per batch of rows)."""
    from duckdb.func import FunctionNullHandling, PythonUDFType

    for name in names:
        function, arity, returns, _ = FUNCTIONS[name]
        con.create_function(
            name,
            function,
            _ARGUMENTS[arity],
            returns,
            type=PythonUDFType.ARROW,
            # The functions take NULLs themselves; mask_bbox returns one for an empty mask.
            null_handling=FunctionNullHandling.SPECIAL,
            side_effects=False,
        )
