"""Model outputs -> table rows: one ``instances`` row per detection, one ``images`` row per image.

Masks become COCO compressed RLE (pycocotools), whose run lengths are counted in column-major
(Fortran) order. Encoding straight from a row-major ``(N, H, W)`` array would count runs
along rows, which decodes as the transposed mask; :func:`encode_masks` lays the masks out as
Fortran-ordered ``(H, W, N)`` first, with one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segpipe.decode import DecodeError
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, STATUS_ERROR, STATUS_OK


@dataclass(frozen=True)
class Detections:
    """Detections of one image, sorted by descending score.

    boxes: float32 (N, 4), ``x0, y0, x1, y1`` in absolute pixels of the input image.
    labels: int64 (N,), indices into the model's category names (0 is the background).
    scores: float32 (N,) in 0..1.
    masks: bool (N, H, W), the mask probabilities thresholded (> mask_threshold) at the
    input image's full resolution.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class ImageRef:
    """Identity of an image in the output: which run, which id and URI, its decoded size."""

    run_id: str
    image_id: str
    uri: str
    width: int
    height: int


def encode_masks(
    masks: np.ndarray, boxes: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """Binary masks ``(N, H, W)`` (bool or 0/1 uint8) -> (RLE counts strings, areas int64).

    Each counts string decodes with ``{"size": [H, W], "counts": s.encode()}``.

    With ``boxes`` (``(N, 4)``, ``x0, y0, x1, y1``), each mask is run-length encoded from the
    full-height strip of columns around its box only: in column-major order that strip is one
    contiguous stretch of the image, so only its first and last runs change. A mask with a
    pixel outside its strip (checked by pixel count) is encoded whole. Same result, without
    copying whole masks into column-major order.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    n = masks.shape[0]
    if n == 0:
        return [], np.zeros(0, dtype=np.int64)
    if boxes is not None:
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must be ({n}, 4), got shape {boxes.shape}")
        encoded = [_encode_near_box(masks[k], boxes[k]) for k in range(n)]
        return [c for c, _ in encoded], np.array([a for _, a in encoded], dtype=np.int64)
    # (N, H, W) -> C-ordered (N, W, H); its transpose (H, W, N) is then Fortran-ordered.
    fortran = np.ascontiguousarray(masks.astype(np.uint8, copy=False).transpose(0, 2, 1))
    rles = mask_utils.encode(fortran.transpose(2, 1, 0))
    areas = mask_utils.area(rles).astype(np.int64)
    return [rle["counts"].decode("ascii") for rle in rles], areas


def _encode_near_box(mask: np.ndarray, box: np.ndarray) -> tuple[str, int]:
    height, width = mask.shape
    area = int(np.count_nonzero(mask))
    x0, x1 = float(box[0]), float(box[2])
    pad = int(0.1 * max(0.0, x1 - x0)) + 2  # torchvision pastes masks slightly past the box
    lo = min(width, max(0, int(np.floor(x0)) - pad))
    hi = max(0, min(width, int(np.ceil(x1)) + pad))
    if hi <= lo or not np.isfinite(x0 + x1):
        lo, hi = 0, width
    # Column-major order of the strip = its transpose in row-major order.
    flat = np.ascontiguousarray(mask[:, lo:hi].T).reshape(-1).view(np.uint8)
    if int(np.count_nonzero(flat)) != area and (lo, hi) != (0, width):
        lo, hi = 0, width
        flat = np.ascontiguousarray(mask.T).reshape(-1).view(np.uint8)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).astype(np.int64)
    if flat.size and flat[0]:
        runs = np.concatenate(([0], runs))  # RLE starts with a run of zeros
    runs[0] += lo * height
    trailing = (width - hi) * height
    if runs.size % 2:  # ends with zeros
        runs[-1] += trailing
    elif trailing:
        runs = np.append(runs, trailing)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    return rle["counts"].decode("ascii"), area


def decode_mask(counts: str, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_masks` for one mask: uint8 ``(height, width)`` of 0/1."""
    decoded: np.ndarray = mask_utils.decode({"size": [height, width], "counts": counts.encode()})
    return decoded


def instances_table(
    refs: Sequence[ImageRef], detections: Sequence[Detections], categories: Sequence[str]
) -> pa.Table:
    """``instances`` rows for a batch of images; ``refs[i]`` describes ``detections[i]``.

    Rows within an image are ordered by descending score and ``instance_id`` is that rank.
    A batch without detections gives an empty table with the same schema.
    """
    if len(refs) != len(detections):
        raise ValueError(f"{len(refs)} image refs for {len(detections)} detection sets")
    columns: dict[str, list[np.ndarray]] = {name: [] for name in INSTANCES_SCHEMA.names}
    strings: dict[str, list[str]] = {"run_id": [], "image_id": [], "uri": [], "label": []}
    rle_counts: list[str] = []
    for ref, det in zip(refs, detections, strict=True):
        n = len(det)
        if n == 0:
            continue
        if det.masks.shape[1:] != (ref.height, ref.width):
            raise ValueError(
                f"masks of {ref.uri} are {det.masks.shape[1:]}, image is {ref.height}x{ref.width}"
            )
        order = np.argsort(-det.scores, kind="stable")
        unordered, unordered_areas = encode_masks(det.masks, det.boxes)
        counts, areas = [unordered[k] for k in order], unordered_areas[order]
        labels = det.labels[order].astype(np.int32)
        boxes = det.boxes[order].astype(np.float32)
        rle_counts.extend(counts)
        strings["run_id"].extend([ref.run_id] * n)
        strings["image_id"].extend([ref.image_id] * n)
        strings["uri"].extend([ref.uri] * n)
        strings["label"].extend(_label_names(labels, categories))
        columns["instance_id"].append(np.arange(n, dtype=np.int32))
        columns["label_id"].append(labels)
        columns["score"].append(det.scores[order].astype(np.float32))
        for k, name in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
            columns[name].append(boxes[:, k])
        columns["mask_area"].append(areas)
        columns["image_width"].append(np.full(n, ref.width, dtype=np.int32))
        columns["image_height"].append(np.full(n, ref.height, dtype=np.int32))
    arrays = []
    for field in INSTANCES_SCHEMA:
        if field.name in strings:
            arrays.append(pa.array(strings[field.name], type=field.type))
        elif field.name == "mask_rle":
            arrays.append(pa.array(rle_counts, type=field.type))
        else:
            parts = columns[field.name]
            values = np.concatenate(parts) if parts else np.zeros(0)
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=INSTANCES_SCHEMA)


@dataclass(frozen=True)
class ImageRecord:
    """One ``images`` row; fields in :data:`IMAGES_SCHEMA` order."""

    run_id: str
    image_id: str
    uri: str
    width: int | None
    height: int | None
    status: str
    error_code: str | None
    error: str | None
    num_instances: int

    @classmethod
    def ok(cls, ref: ImageRef, num_instances: int) -> ImageRecord:
        return cls(
            ref.run_id,
            ref.image_id,
            ref.uri,
            ref.width,
            ref.height,
            STATUS_OK,
            None,
            None,
            num_instances,
        )

    @classmethod
    def failed(cls, run_id: str, image_id: str, uri: str, err: DecodeError) -> ImageRecord:
        return cls(
            run_id, image_id, uri, err.width, err.height, STATUS_ERROR, err.code, err.message, 0
        )


def images_table(records: Sequence[ImageRecord]) -> pa.Table:
    """One ``images`` row per input image, decoded or not."""
    columns = list(zip(*(astuple(r) for r in records), strict=True)) if records else None
    arrays = [
        pa.array(list(columns[i]) if columns else [], type=field.type)
        for i, field in enumerate(IMAGES_SCHEMA)
    ]
    return pa.Table.from_arrays(arrays, schema=IMAGES_SCHEMA)


def _label_names(labels: np.ndarray, categories: Sequence[str]) -> list[str]:
    return [categories[i] if 0 <= i < len(categories) else f"class_{i}" for i in labels.tolist()]
