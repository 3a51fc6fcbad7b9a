"""Model outputs -> rows: RLE round trips, ordering, empty batches, and a SQL read-back."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from segpipe.core.detections import Detections
from segpipe.core.encode import decode_mask, encode_detections, encode_window
from segpipe.core.rows import ImageRecord, ImageRef, images_table
from segpipe.job.stages import encode_rows, image_rows, split_tables
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, Failure, image_id
from tests.masks import detections_from_full_masks, instances_rows

CATEGORIES = ("__background__", "circle", "square", "triangle")


def random_masks(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1, x1 = rng.integers(y0 + 1, height + 1), rng.integers(x0 + 1, width + 1)
        masks[i, y0:y1, x0:x1] = True
        masks[i] &= rng.random((height, width)) > 0.2
    return masks


def encode_masks(masks: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The RLE counts strings and areas of image-sized masks ``(N, H, W)``, encoded as the
    library encodes detections (each mask from the window around its pixels)."""
    n = len(masks)
    zeros = np.zeros(n, np.float32)
    det = detections_from_full_masks(np.zeros((n, 4), np.float32), zeros, zeros, masks)
    return encode_detections(det)


def detections(masks: np.ndarray, scores: list[float], labels: list[int]) -> Detections:
    n, height, width = masks.shape
    boxes = np.tile(np.array([1.5, 2.5, width - 1.0, height - 2.0], dtype=np.float32), (n, 1))
    return detections_from_full_masks(
        boxes=boxes,
        labels=np.array(labels, dtype=np.int64),
        scores=np.array(scores, dtype=np.float32),
        masks=masks,
    )


@pytest.mark.parametrize("shape", [(3, 37, 53), (3, 53, 37), (2, 1, 40), (2, 40, 1), (1, 8, 8)])
def test_rle_round_trip_including_non_square(shape: tuple[int, int, int]) -> None:
    masks = random_masks(*shape)
    counts, areas = encode_masks(masks)
    assert len(counts) == shape[0]
    for mask, s, area in zip(masks, counts, areas, strict=True):
        back = decode_mask(s, shape[1], shape[2])
        assert back.shape == mask.shape
        np.testing.assert_array_equal(back.astype(bool), mask)
        assert area == mask.sum()


def test_transposed_encoding_would_be_caught() -> None:
    # A mask that is not symmetric: its transpose must not decode to itself.
    mask = np.zeros((1, 10, 20), dtype=bool)
    mask[0, 0, :15] = True
    (counts,), _ = encode_masks(mask)
    np.testing.assert_array_equal(decode_mask(counts, 10, 20)[0, :15], 1)
    assert decode_mask(counts, 10, 20)[1:].sum() == 0


def test_empty_masks_and_uint8_input() -> None:
    masks = np.zeros((2, 12, 30), dtype=np.uint8)
    masks[1, 3:5, 4:9] = 1
    counts, areas = encode_masks(masks)
    assert areas.tolist() == [0, 10]
    assert decode_mask(counts[0], 12, 30).sum() == 0


def test_rows_are_ordered_by_score_with_rank_ids() -> None:
    masks = random_masks(3, 20, 30)
    det = detections(masks, scores=[0.2, 0.9, 0.5], labels=[1, 2, 3])
    ref = ImageRef("run1", image_id("s3://b/a.jpg"), "s3://b/a.jpg", width=30, height=20)
    table = instances_rows([ref], [det], CATEGORIES)
    assert table.schema == INSTANCES_SCHEMA
    rows = table.to_pylist()
    assert [r["instance_id"] for r in rows] == [0, 1, 2]
    assert [r["label"] for r in rows] == ["square", "triangle", "circle"]
    assert [round(r["score"], 3) for r in rows] == [0.9, 0.5, 0.2]
    for row, original in zip(rows, masks[[1, 2, 0]], strict=True):
        assert (row["image_width"], row["image_height"]) == (30, 20)
        np.testing.assert_array_equal(decode_mask(row["mask_rle"], 20, 30), original)
        assert row["mask_area"] == original.sum()
        assert (row["box_x0"], row["box_y0"], row["box_x1"], row["box_y1"]) == (1.5, 2.5, 29, 18)


def test_zero_detections_keep_the_schema() -> None:
    empty = detections_from_full_masks(
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros(0, np.int64),
        scores=np.zeros(0, np.float32),
        masks=np.zeros((0, 20, 30), bool),
    )
    ref = ImageRef("run1", "id", "u", 30, 20)
    none_table = instances_rows([ref], [empty], CATEGORIES)
    assert none_table.num_rows == 0 and none_table.schema == INSTANCES_SCHEMA
    assert instances_rows([], [], CATEGORIES).schema == INSTANCES_SCHEMA
    some = instances_rows(
        [ref], [detections(random_masks(2, 20, 30), [0.5, 0.4], [1, 1])], CATEGORIES
    )
    assert pa.concat_tables([none_table, some]).num_rows == 2


def test_mask_size_must_match_the_image() -> None:
    det = detections(random_masks(1, 20, 30), [0.5], [1])
    with pytest.raises(ValueError, match="are for a 30x20 image, image is 20x30"):
        instances_rows([ImageRef("r", "i", "u", width=20, height=30)], [det], CATEGORIES)


def test_images_table_ok_and_error_rows() -> None:
    ok = ImageRecord.ok(ImageRef("r", "i1", "u1", 30, 20), num_instances=3, tiles=6)
    bad = ImageRecord.failed("r", "i2", "u2", Failure("truncated", "JPEG data is truncated"))
    table = images_table([ok, bad])
    assert table.schema == IMAGES_SCHEMA
    assert table.to_pylist() == [
        dict(run_id="r", image_id="i1", uri="u1", width=30, height=20, status="ok",
             error_code=None, error=None, num_instances=3, tiles=6),
        dict(run_id="r", image_id="i2", uri="u2", width=None, height=None, status="error",
             error_code="truncated", error="JPEG data is truncated", num_instances=0, tiles=0),
    ]  # fmt: skip
    assert images_table([]).schema == IMAGES_SCHEMA


def test_image_id_is_stable_and_distinct() -> None:
    assert image_id("s3://b/a.jpg") == image_id("s3://b/a.jpg")
    assert image_id("s3://b/a.jpg") != image_id("s3://b/b.jpg")
    assert len(image_id("x")) == 32
    # Pinned: the id must never change between releases, or runs stop joining.
    assert image_id("s3://bucket/img/0001.jpg") == "b345ffe4dc775fae4a3c3f8a98132a67"


def test_parquet_read_back_through_duckdb(tmp_path: Path) -> None:
    masks = random_masks(4, 25, 41, seed=3)
    ref = ImageRef("run1", image_id("file:///x.png"), "file:///x.png", width=41, height=25)
    table = instances_rows(
        [ref], [detections(masks, [0.9, 0.8, 0.7, 0.6], [1, 2, 3, 1])], CATEGORIES
    )
    path = tmp_path / "instances.parquet"
    pq.write_table(table, path)
    rows = duckdb.sql(
        f"SELECT instance_id, label, mask_rle, mask_area, image_height, image_width "
        f"FROM read_parquet('{path}') ORDER BY instance_id"
    ).fetchall()
    assert [r[1] for r in rows] == ["circle", "square", "triangle", "circle"]
    for (_, _, rle, area, h, w), original in zip(rows, masks, strict=True):
        np.testing.assert_array_equal(decode_mask(rle, h, w), original)
        assert area == original.sum()


def unit_rows(seed: int) -> pa.Table:
    """Per-image rows of one image with three detections, as the model actors emit them."""
    uri = f"file:///unit{seed}.png"
    batch = {
        "uri": np.array([uri], dtype=object),
        "image_id": np.array([image_id(uri)], dtype=object),
        "width": np.array([30], dtype=np.int32),
        "height": np.array([20], dtype=np.int32),
        "status": np.array(["ok"], dtype=object),
        "error_code": np.array([""], dtype=object),
        "error": np.array([""], dtype=object),
    }
    det = detections(random_masks(3, 20, 30, seed=seed), [0.9, 0.5, 0.2], [1, 2, 3])
    return image_rows(batch, "run1", {0: det}, CATEGORIES)


def offsets64(array: pa.Array) -> np.ndarray:
    """The offsets of a string or binary array, its offsets buffer read as int64."""
    values = np.frombuffer(array.buffers()[1], dtype=np.int64)
    return values[array.offset : array.offset + len(array) + 1]


def test_masks_have_64_bit_offsets_in_memory() -> None:
    """The packed windows and the RLE strings are Arrow large types (int64 offsets) wherever
    a unit's rows are held, so a unit's masks can pass 2 GiB in one array."""
    windowed = unit_rows(0)
    bits = windowed.column("instances").combine_chunks().flatten().field("mask_bits")
    assert bits.type == pa.large_binary()
    assert np.diff(offsets64(bits)).tolist() == [len(b) for b in bits.to_pylist()]
    encoded = [encode_rows(unit_rows(seed)) for seed in (0, 1)]
    for rows in encoded:
        assert rows.column("instances").type.value_type.field("mask_rle").type == pa.large_string()
    # The write sink concatenates its blocks, then splits them into the two tables.
    _, instances = split_tables(pa.concat_tables(encoded))
    assert instances.schema == INSTANCES_SCHEMA and instances.num_rows == 6
    rle = instances.column("mask_rle").combine_chunks()
    assert rle.type == pa.large_string()
    assert np.diff(offsets64(rle)).tolist() == [len(s) for s in rle.to_pylist()]
    # Instances tables of two units, concatenated and combined.
    both = pa.concat_tables([split_tables(rows)[1] for rows in encoded]).combine_chunks()
    (chunk,) = both.column("mask_rle").chunks
    assert chunk.type == pa.large_string() and chunk.equals(rle)
    assert np.diff(offsets64(chunk)).tolist() == [len(s) for s in chunk.to_pylist()]
    masks = random_masks(3, 20, 30, seed=0)
    for counts, original in zip(chunk.to_pylist()[:3], masks, strict=True):
        np.testing.assert_array_equal(decode_mask(counts, 20, 30), original)


def test_encoding_from_windows_equals_pycocotools_on_whole_masks() -> None:
    """A mask encoded from its window, wherever the window lies (at the image's edges and
    corners, larger than the mask, empty, 1 pixel), gives pycocotools' RLE of the whole mask."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = int(rng.integers(x0, width + 1)), int(rng.integers(y0, height + 1))
        window = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.0, 0.3, 0.8, 1.0])
        whole = np.zeros((height, width), dtype=np.uint8)
        whole[y0:y1, x0:x1] = window
        expected = mask_utils.encode(np.asfortranarray(whole))
        counts, area = encode_window(window, x0, y0, height, width)
        assert counts == expected["counts"].decode("ascii"), (height, width, x0, y0, x1, y1)
        assert area == whole.sum()
    full = np.ones((2, 5, 7), dtype=bool)
    assert encode_masks(full)[0] == [
        mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in full
    ]


def test_windows_must_lie_inside_the_image() -> None:
    args = dict(
        boxes=np.zeros((1, 4), np.float32),
        labels=np.ones(1, np.int64),
        scores=np.ones(1, np.float32),
        image_size=(10, 20),
    )
    Detections(masks=[np.ones((10, 20), bool)], mask_origins=np.zeros((1, 2), np.int32), **args)
    with pytest.raises(ValueError, match="not inside the 20x10 image"):
        Detections(masks=[np.ones((3, 3), bool)], mask_origins=np.array([[18, 0]]), **args)
    with pytest.raises(ValueError, match="need 1 mask windows"):
        Detections(masks=[], mask_origins=np.zeros((0, 2), np.int32), **args)
