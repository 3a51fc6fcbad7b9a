"""Detections and failures -> table rows: ``images`` rows and, for the model actors to emit,
``instances`` rows whose masks are still packed windows (:data:`WINDOWED_SCHEMA`; the encode
step replaces them with ``mask_rle`` and ``mask_area``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import pyarrow as pa

from segpipe.core.detections import Detections
from segpipe.core.encode import MASK_WINDOW_FIELDS
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, STATUS_ERROR, STATUS_OK, Failure


@dataclass(frozen=True)
class ImageRef:
    """Identity of an image in the output: which run, which id and URI, its decoded size."""

    run_id: str
    image_id: str
    uri: str
    width: int
    height: int


WINDOWED_SCHEMA = pa.schema(
    [
        g
        for f in INSTANCES_SCHEMA
        for g in (MASK_WINDOW_FIELDS if f.name == "mask_rle" else [f])
        if g.name != "mask_area"
    ]
)


def windowed_instances_table(
    refs: Sequence[ImageRef], detections: Sequence[Detections], categories: Sequence[str]
) -> pa.Table:
    """``instances`` rows for a batch of images, with each mask as its packed window
    (:data:`WINDOWED_SCHEMA`): what the model actors emit. ``refs[i]`` describes
    ``detections[i]``. Rows within an image are ordered by descending score and
    ``instance_id`` is that rank. A batch without detections gives an empty table with the
    same schema."""
    if len(refs) != len(detections):
        raise ValueError(f"{len(refs)} image refs for {len(detections)} detection sets")
    columns: dict[str, list[np.ndarray]] = {name: [] for name in WINDOWED_SCHEMA.names}
    strings: dict[str, list[str]] = {"run_id": [], "image_id": [], "uri": [], "label": []}
    bits: list[bytes] = []
    for ref, det in zip(refs, detections, strict=True):
        n = len(det)
        if n == 0:
            continue
        if det.image_size != (ref.height, ref.width):
            height, width = det.image_size
            raise ValueError(
                f"detections of {ref.uri} are for a {width}x{height} image, "
                f"image is {ref.width}x{ref.height}"
            )
        order = np.argsort(-det.scores, kind="stable")
        labels = det.labels[order].astype(np.int32)
        boxes = det.boxes[order].astype(np.float32)
        windows = [det.masks[k] for k in order]
        bits.extend(np.packbits(w, axis=None).tobytes() for w in windows)
        strings["run_id"].extend([ref.run_id] * n)
        strings["image_id"].extend([ref.image_id] * n)
        strings["uri"].extend([ref.uri] * n)
        strings["label"].extend(_label_names(labels, categories))
        columns["instance_id"].append(np.arange(n, dtype=np.int32))
        columns["label_id"].append(labels)
        columns["score"].append(det.scores[order].astype(np.float32))
        for k, name in enumerate(("box_x0", "box_y0", "box_x1", "box_y1")):
            columns[name].append(boxes[:, k])
        origins = det.mask_origins[order]
        columns["mask_x"].append(origins[:, 0])
        columns["mask_y"].append(origins[:, 1])
        columns["mask_w"].append(np.array([w.shape[1] for w in windows], dtype=np.int32))
        columns["mask_h"].append(np.array([w.shape[0] for w in windows], dtype=np.int32))
        columns["image_width"].append(np.full(n, ref.width, dtype=np.int32))
        columns["image_height"].append(np.full(n, ref.height, dtype=np.int32))
    arrays = []
    for field in WINDOWED_SCHEMA:
        if field.name in strings:
            arrays.append(pa.array(strings[field.name], type=field.type))
        elif field.name == "mask_bits":
            arrays.append(pa.array(bits, type=field.type))
        else:
            parts = columns[field.name]
            values = np.concatenate(parts) if parts else np.zeros(0)
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=WINDOWED_SCHEMA)


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
    tiles: int = 0  # how many tiles the image was cut into for the model; 0: whole

    @classmethod
    def ok(cls, ref: ImageRef, num_instances: int, tiles: int = 0) -> ImageRecord:
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
            tiles,
        )

    @classmethod
    def failed(
        cls, run_id: str, image_id: str, uri: str, err: Failure, tiles: int = 0
    ) -> ImageRecord:
        return cls(
            run_id,
            image_id,
            uri,
            err.width,
            err.height,
            STATUS_ERROR,
            err.code,
            err.message,
            0,
            tiles,
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
