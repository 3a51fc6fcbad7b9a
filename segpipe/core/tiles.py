"""Tiled inference: a huge image cut into overlapping tiles, its tiles' detections merged.

Contract:

- Grid (:func:`tile_grid`): tiles of ``tile`` x ``tile`` pixels (narrower only along a side
  the image is shorter than ``tile``) cover the image at native resolution. Along each axis
  the first tile starts at 0, the last ends at the image's edge, and the starts in between
  are spread evenly, so that neighbours share at least ``overlap`` pixels. Tiles are listed
  row by row, top to bottom, left to right.
- Each tile is an ordinary model input: the model's transform rescales it (short side to
  ``min_size``), so a tile as large as ``min_size`` runs at native scale.
- Merge (:func:`merge_tiles`): a tile's detections are moved to image coordinates (boxes and
  mask windows shifted by the tile's origin). A detection is *cut* when its box reaches
  (within :data:`CUT_MARGIN` pixels) a border of its tile that lies inside the image: the
  model saw part of an object, and judged its class and score from that part (half a
  circle is often called a triangle). Two detections from two overlapping tiles may be one
  object when, inside the area the two tiles share, their masks' IoU is at least
  ``match_iou``, and they are of one class or one of them is cut. An object seen whole in
  one tile and cut by the other's border agrees there, and so do two halves of an object
  larger than the overlap. Candidate pairs are joined best IoU first, transitively (an
  object across four tiles is one), but never so that an object holds two uncut
  detections of one tile: a tile that saw an object whole saw it once, and two such
  detections (the model's own per-class NMS kept both) stay two objects; cut views join
  freely (a tile often gives one part two classes). A group becomes one instance: its
  best-scoring member that is not cut, as it is, when a tile saw the object whole (the cut
  views are parts of it, with sloppier edges); else the union of the members' masks (a
  window around them all) and of their boxes, with the best member's class and score.
  The instances are ordered by descending score and at most ``max_detections`` kept.
- No full-image canvas is made: masks stay windows around their boxes (see
  :mod:`segpipe.core.detections`), also when merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from segpipe.config import TileConfig
from segpipe.core.detections import Detections

# The model on a batch: RGB uint8 images and the (height, width) of each -> their detections
# (a :class:`segpipe.core.model.Segmenter`).
Model = Callable[[Sequence[np.ndarray], Sequence[tuple[int, int]]], list[Detections]]
# A detection whose box comes this near a border of its tile inside the image is "cut".
CUT_MARGIN = 2.0


@dataclass(frozen=True)
class Tile:
    """A tile's place in its image: top-left ``(x, y)``, ``width`` x ``height`` pixels."""

    x: int
    y: int
    width: int
    height: int

    def crop(self, pixels: np.ndarray) -> np.ndarray:
        """The tile's pixels of an image's ``(H, W, 3)`` array (a view, no copy)."""
        return pixels[self.y : self.y + self.height, self.x : self.x + self.width]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` pixels start along a side of ``length`` pixels."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The tiles covering a ``height`` x ``width`` image, row by row (see the module doc)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    h, w = min(tile, height), min(tile, width)
    return [
        Tile(x, y, w, h)
        for y in tile_starts(height, tile, overlap)
        for x in tile_starts(width, tile, overlap)
    ]


def tiles_of(
    size: tuple[int, int], pixels_shape: tuple[int, ...], tiling: TileConfig
) -> list[Tile]:
    """The tiles an image of full-resolution ``size`` = ``(height, width)`` is cut into, or
    none when it goes through whole: tiling is off, the image is not over ``tile_above``, or
    its pixels (of ``pixels_shape``) were not decoded at full resolution."""
    height, width = size
    if not tiling.tiled(height, width) or tuple(pixels_shape[:2]) != (height, width):
        return []
    return tile_grid(height, width, tiling.tile, tiling.tile_overlap)


def segment_tiled(
    model: Model,
    images: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    tiling: TileConfig,
    batch_size: int,
) -> list[Detections]:
    """``model`` over ``images`` (of full-resolution ``sizes``), each image it tiles
    (:func:`tiles_of`) as its tiles. The images that go whole go in one call, as they do
    without tiling (so their detections are the same); the tiles of all the tiled images
    go in batches of ``batch_size``, and a tiled image's detections are its tiles' merged
    (:func:`merge_tiles`). One result per image, in order. An exception of the model on any
    call propagates (the caller then runs the images one by one)."""
    plans = [tiles_of(size, image.shape, tiling) for image, size in zip(images, sizes, strict=True)]
    whole = [i for i, tiles in enumerate(plans) if not tiles]
    results: list[Detections | None] = [None] * len(images)
    if whole:
        found = model([images[i] for i in whole], [sizes[i] for i in whole])
        for i, detections in zip(whole, found, strict=True):
            results[i] = detections
    inputs = [
        (t.crop(images[i]), (t.height, t.width)) for i, tiles in enumerate(plans) for t in tiles
    ]
    parts: list[Detections] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        parts.extend(model([p for p, _ in chunk], [s for _, s in chunk]))
    at = 0
    for i, tiles in enumerate(plans):
        if tiles:
            found_i = parts[at : at + len(tiles)]
            at += len(tiles)
            results[i] = merge_tiles(
                tiles, found_i, sizes[i], tiling.tile_match_iou, tiling.tile_max_detections
            )
    return [r for r in results if r is not None]


def merge_tiles(
    tiles: Sequence[Tile],
    found: Sequence[Detections],
    image_size: tuple[int, int],
    match_iou: float,
    max_detections: int,
) -> Detections:
    """One image's :class:`Detections` (of ``image_size`` = ``(height, width)``) from its
    ``tiles``' detections (``found[k]`` in tile k's own coordinates); the rule is the
    module's."""
    boxes, labels, scores, masks, origins, owner = _in_image(tiles, found)
    cut = _cut(tiles, owner, boxes, image_size)
    pairs: list[tuple[float, int, int]] = []
    for a, b in _neighbours(tiles):
        pairs += _matches(tiles[a], tiles[b], owner == a, owner == b, labels, boxes, cut,
                          masks, origins, match_iou)  # fmt: skip
    groups = _Groups(owner, cut)
    for _, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        groups.join(i, j)
    merged = [_merged(members, boxes, scores, cut, masks, origins) for members in groups.sets()]
    merged.sort(key=lambda m: -m[1])
    merged = merged[:max_detections]
    return Detections(
        boxes=np.array([m[0] for m in merged], dtype=np.float32).reshape(-1, 4),
        labels=np.array([labels[m[4]] for m in merged], dtype=np.int64),
        scores=np.array([m[1] for m in merged], dtype=np.float32),
        masks=[m[2] for m in merged],
        mask_origins=np.array([m[3] for m in merged], dtype=np.int32).reshape(-1, 2),
        image_size=image_size,
    )


def _cut(
    tiles: Sequence[Tile], owner: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """Which detections reach a border of their tile that lies inside the image (within
    :data:`CUT_MARGIN` pixels): views of objects the tile cuts, whose class and score the
    model judged from a part."""
    height, width = image_size
    t = np.array([[x.x, x.y, x.x + x.width, x.y + x.height] for x in tiles], dtype=np.float32)
    edges = t.reshape(-1, 4)[owner]
    inside = edges > 0
    inside[:, 2] = edges[:, 2] < width
    inside[:, 3] = edges[:, 3] < height
    near = np.abs(boxes - edges) <= CUT_MARGIN
    return np.asarray((near & inside).any(axis=1))


def _in_image(
    tiles: Sequence[Tile], found: Sequence[Detections]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """All tiles' detections, concatenated and shifted to image coordinates, and the index
    of the tile each came from."""
    if len(tiles) != len(found):
        raise ValueError(f"{len(tiles)} tiles but {len(found)} sets of detections")

    def joined(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
        return np.concatenate([np.zeros(shape, dtype=dtype), *parts]).astype(dtype)

    boxes = joined(
        [
            d.boxes.reshape(-1, 4) + np.array([t.x, t.y, t.x, t.y])
            for d, t in zip(found, tiles, strict=True)
        ],
        (0, 4),
        np.float32,
    )
    labels = joined([d.labels for d in found], (0,), np.int64)
    scores = joined([d.scores for d in found], (0,), np.float32)
    masks = [m for d in found for m in d.masks]
    origins = joined(
        [
            d.mask_origins.reshape(-1, 2) + np.array([t.x, t.y])
            for d, t in zip(found, tiles, strict=True)
        ],
        (0, 2),
        np.int64,
    )
    owner = joined([np.full(len(d), k) for k, d in enumerate(found)], (0,), np.int64)
    return boxes, labels, scores, masks, origins, owner


def _neighbours(tiles: Sequence[Tile]) -> list[tuple[int, int]]:
    """Pairs ``(a, b)`` of tiles that share pixels, each pair once. Only the tiles whose
    starts lie within a tile's extent of tile a's are looked at (the grid's rows and
    columns, found by bisection), so the cost grows with the tiles, not their square."""
    if not tiles:
        return []
    span_x = max(t.width for t in tiles)
    xs = np.array(sorted({t.x for t in tiles}))
    ys = np.array(sorted({t.y for t in tiles}))
    by_place = {(t.x, t.y): k for k, t in enumerate(tiles)}
    pairs = []
    for a, t in enumerate(tiles):
        near_x = xs[np.searchsorted(xs, t.x - span_x, "right") : np.searchsorted(xs, t.x + t.width)]
        near_y = ys[np.searchsorted(ys, t.y) : np.searchsorted(ys, t.y + t.height)]
        for y in near_y.tolist():
            for x in near_x.tolist():
                b = by_place.get((x, y))
                if b is None or (y, x) <= (t.y, t.x):
                    continue  # not a tile, tile a itself, or a pair met from its other end
                other = tiles[b]
                if x < t.x + t.width and t.x < x + other.width and y < t.y + t.height:
                    pairs.append((a, b))
    return pairs


def _matches(
    ta: Tile,
    tb: Tile,
    in_a: np.ndarray,
    in_b: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    cut: np.ndarray,
    masks: list[np.ndarray],
    origins: np.ndarray,
    match_iou: float,
) -> list[tuple[float, int, int]]:
    """``(iou, i, j)`` for the detections i of tile ``ta`` and j of ``tb`` that may be one
    object: their masks' IoU within the two tiles' shared area is at least ``match_iou``,
    and they are of one class or one of them is cut (module rule)."""
    x0, y0 = max(ta.x, tb.x), max(ta.y, tb.y)
    x1, y1 = min(ta.x + ta.width, tb.x + tb.width), min(ta.y + ta.height, tb.y + tb.height)
    if x1 <= x0 or y1 <= y0:
        return []
    shared = (x0, y0, x1, y1)
    side_a = [i for i in np.flatnonzero(in_a).tolist() if _touches(boxes[i], shared)]
    side_b = [j for j in np.flatnonzero(in_b).tolist() if _touches(boxes[j], shared)]
    crops: dict[int, np.ndarray] = {}
    found: list[tuple[float, int, int]] = []
    for i in side_a:
        for j in side_b:
            if not _touches(boxes[i], boxes[j]):
                continue
            if labels[i] != labels[j] and not (cut[i] or cut[j]):
                continue
            ci = crops.get(i)
            if ci is None:
                ci = crops[i] = _crop(masks[i], origins[i], shared)
            cj = crops.get(j)
            if cj is None:
                cj = crops[j] = _crop(masks[j], origins[j], shared)
            union = np.count_nonzero(ci | cj)
            if union and np.count_nonzero(ci & cj) >= match_iou * union:
                found.append((np.count_nonzero(ci & cj) / union, i, j))
    return found


def _touches(box: np.ndarray | Sequence[float], other: np.ndarray | Sequence[float]) -> bool:
    """Whether two ``x0, y0, x1, y1`` rectangles overlap (share some area)."""
    return bool(box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3])


def _crop(window: np.ndarray, origin: np.ndarray, area: tuple[int, int, int, int]) -> np.ndarray:
    """A mask window (at ``origin``) as a bool array over ``area`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = area
    out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    wx, wy = int(origin[0]), int(origin[1])
    h, w = window.shape
    ox0, oy0 = max(wx, x0), max(wy, y0)
    ox1, oy1 = min(wx + w, x1), min(wy + h, y1)
    if ox1 > ox0 and oy1 > oy0:
        out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = window[
            oy0 - wy : oy1 - wy, ox0 - wx : ox1 - wx
        ]
    return out


def _merged(
    members: list[int],
    boxes: np.ndarray,
    scores: np.ndarray,
    cut: np.ndarray,
    masks: list[np.ndarray],
    origins: np.ndarray,
) -> tuple[np.ndarray, float, np.ndarray, tuple[int, int], int]:
    """(box, score, window, origin, the member whose class and score it takes) of a group of
    detections of one object: its best-scoring member not cut by its tile, whole; else (no
    tile saw it whole) the union of the members' masks and boxes, with the best member's
    class and score."""
    whole = [k for k in members if not cut[k]]
    best = max(whole or members, key=lambda k: (scores[k], -k))
    if whole or len(members) == 1:
        # A tile saw the object whole: that view is the object; its cut views add nothing
        # but their sloppier edges (a part's box and mask are judged from the part).
        return boxes[best], float(scores[best]), masks[best], tuple(origins[best]), best
    box = np.concatenate([boxes[members, :2].min(axis=0), boxes[members, 2:].max(axis=0)])
    x0 = min(int(origins[k][0]) for k in members)
    y0 = min(int(origins[k][1]) for k in members)
    x1 = max(int(origins[k][0]) + masks[k].shape[1] for k in members)
    y1 = max(int(origins[k][1]) + masks[k].shape[0] for k in members)
    window = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for k in members:
        x, y = int(origins[k][0]) - x0, int(origins[k][1]) - y0
        h, w = masks[k].shape
        window[y : y + h, x : x + w] |= masks[k]
    return box, float(scores[best]), window, (x0, y0), best


class _Groups:
    """Detections joined into objects, each object holding at most one uncut detection of
    each tile: a tile that saw an object whole saw it once, and two whole detections of one
    tile (the model's per-class NMS kept both) are two objects, as the model said. Cut
    views join freely (a tile often gives the same part two classes). ``owner[k]``:
    detection k's tile; ``cut[k]``: whether it is cut."""

    def __init__(self, owner: np.ndarray, cut: np.ndarray) -> None:
        self.parent = list(range(len(owner)))
        self.tiles: list[set[int]] = [
            set() if c else {int(t)} for t, c in zip(owner.tolist(), cut.tolist(), strict=True)
        ]

    def find(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def join(self, a: int, b: int) -> None:
        """Join the objects of ``a`` and ``b``, unless both have an uncut detection of one
        tile."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb or self.tiles[ra] & self.tiles[rb]:
            return
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        self.tiles[keep] |= self.tiles[gone]
        self.tiles[gone] = set()

    def sets(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for k in range(len(self.parent)):
            out.setdefault(self.find(k), []).append(k)
        return list(out.values())
