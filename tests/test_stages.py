"""The batch steps chained in-process: every input accounted for, nested rows flattened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from segpipe.config import DecodeConfig, ModelConfig
from segpipe.core.detections import Detections
from segpipe.core.encode import decode_mask
from segpipe.core.model import Segmenter
from segpipe.core.rows import ImageRef
from segpipe.job.inputs import COPIES_COLUMN, EXTRAS_COLUMN, prepare_manifest_batch
from segpipe.job.stages import (
    INSTANCE_STRUCT,
    Segment,
    distinct_images,
    encode_rows,
    image_rows,
    load_batch,
    split_tables,
    take_copies,
    with_image_ids,
)
from segpipe.job.writer import write_table
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, image_id
from segpipe.tools.samples import sample_image
from tests.masks import detections_from_full_masks, full_masks, instances_rows

SMALL = dict(min_size=96, max_size=160, max_detections=8)


@pytest.fixture(scope="module")
def weights(random_checkpoint: Path) -> str:
    return str(random_checkpoint)


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    uris = []
    for i, (fmt, ext) in enumerate([("JPEG", "jpg"), ("PNG", "png"), ("JPEG", "jpg")]):
        path = tmp_path / f"sample_{i:05d}.{ext}"
        sample_image(7 * 1_000_003 + i).save(path, format=fmt)
        uris.append(path.as_uri())
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return [*uris, (tmp_path / "bad.jpg").as_uri(), (tmp_path / "missing.png").as_uri()]


def test_load_batch_accounts_for_every_uri(inputs: list[str]) -> None:
    batch = {"uri": np.array(inputs, dtype=object), "source": np.array(list("abcde"), object)}
    loaded = load_batch(batch, DecodeConfig())
    assert sorted(loaded["uri"]) == sorted(inputs)
    # Ordered by aspect ratio so that model batches pad less; error rows last, in input order.
    assert list(loaded["status"]) == ["ok", "ok", "ok", "error", "error"]
    ratios = list(loaded["width"][:3] / loaded["height"][:3])
    assert ratios == sorted(ratios) and len(set(ratios)) > 1
    assert list(loaded["error_code"][3:]) == ["corrupt", "not_found"]
    assert "missing.png" in loaded["error"][4]
    source = dict(zip(inputs, "abcde", strict=True))
    assert list(loaded["source"]) == [source[u] for u in loaded["uri"]]  # rows move whole
    assert [p.shape[2] for p in loaded["pixels"]] == [3] * 5
    assert [p.shape[:2] for p in loaded["pixels"][:3]] == list(
        zip(loaded["height"][:3], loaded["width"][:3], strict=True)
    )
    assert list(loaded["image_id"]) == [image_id(u) for u in loaded["uri"]]


def test_segment_then_split_equals_the_core(
    inputs: list[str], weights: str, tmp_path: Path
) -> None:
    cfg = ModelConfig(weights=weights, device="cpu", **SMALL)
    batch = {"uri": np.array(inputs, dtype=object), "source": np.array(list("abcde"), object)}
    loaded = load_batch(batch, DecodeConfig())
    rows = Segment(cfg, run_id="r1")(loaded)
    images, instances = split_tables(rows)
    assert images.schema.names == [*IMAGES_SCHEMA.names, "source"]
    assert instances.schema == INSTANCES_SCHEMA
    assert images.num_rows == len(inputs)
    assert images.column("num_instances").to_pylist()[3:] == [0, 0]
    assert sum(images.column("num_instances").to_pylist()) == instances.num_rows > 0

    # The same images through the core directly give the same rows.
    segmenter = Segmenter(cfg)
    pixels = list(loaded["pixels"][:3])
    refs = [
        ImageRef("r1", image_id(u), u, p.shape[1], p.shape[0])
        for u, p in zip(loaded["uri"][:3], pixels, strict=True)
    ]
    expected = instances_rows(refs, segmenter(pixels), segmenter.categories)
    assert instances.equals(expected)

    # And the same rows come back from Parquet through SQL.
    for name, table in (("images", images), ("instances", instances)):
        write_table(table, str(tmp_path / "out"), name, partition_by=["run_id"], file_stem="p0")
    back = duckdb.sql(
        f"SELECT {', '.join(INSTANCES_SCHEMA.names)} FROM read_parquet("
        f"'{tmp_path}/out/instances/**/*.parquet', hive_partitioning=true) "
        "ORDER BY uri, instance_id"
    ).to_arrow_table()
    expected_sorted = expected.sort_by([("uri", "ascending"), ("instance_id", "ascending")])
    assert back.to_pylist() == expected_sorted.to_pylist()


def test_a_batch_without_detections_keeps_its_shape(inputs: list[str], weights: str) -> None:
    cfg = ModelConfig(weights=weights, device="cpu", score_threshold=1.0, **SMALL)
    rows = Segment(cfg, run_id="r1")(load_batch({"uri": np.array(inputs, object)}, DecodeConfig()))
    images, instances = split_tables(rows)
    assert instances.num_rows == 0 and instances.schema == INSTANCES_SCHEMA
    assert images.num_rows == len(inputs)
    assert isinstance(rows.column("instances").type, pa.ListType)


def test_segment_runs_a_failing_batch_one_by_one(
    inputs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model failing on one image costs that image only: it becomes a model_error row,
    the rest of its batch keeps its detections. torch_threads reaches torch."""
    import torch

    threads = torch.get_num_threads()
    try:
        segment = Segment(ModelConfig(weights="shapes", device="cpu"), "r", torch_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    loaded = load_batch({"uri": np.array(inputs, dtype=object)}, DecodeConfig())
    poisoned = loaded["pixels"][1]
    real = segment.segmenter.__call__

    def flaky(images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[object]:
        if any(image is poisoned for image in images):
            # About this image only (a CUDA error would end the actor: test_budget.py).
            raise RuntimeError("shape '[0, 4]' is invalid for input of size 3")
        return real(images, sizes)

    # Calls look __call__ up on the type: patch the class for this test only.
    monkeypatch.setattr(type(segment.segmenter), "__call__", lambda self, *args: flaky(*args))
    images, _ = split_tables(segment(loaded))
    rows = images.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error", "error"]
    assert rows[1]["error_code"] == "model_error"
    assert "the model failed on this image: RuntimeError: shape" in rows[1]["error"]
    assert rows[3]["error_code"] != "model_error"  # decode errors keep their own cause


def test_encode_rows_on_slices_and_chunks() -> None:
    """Ray hands encode_rows slices of blocks and tables of several chunks: each gives the
    rows the whole table gives, error rows and images without detections included."""
    rng = np.random.default_rng(5)
    sizes = [(20, 30), (31, 17), (12, 12), (40, 25), (25, 40)]  # (height, width)
    detections: dict[int, Detections] = {}
    for i, (height, width) in enumerate(sizes):
        if i == 2:
            continue  # an error row
        n = 0 if i == 3 else 3
        masks = rng.random((n, height, width)) < 0.3
        boxes = np.tile(np.array([0, 0, width, height], np.float32), (n, 1))
        scores = rng.random(n).astype(np.float32)
        detections[i] = detections_from_full_masks(boxes, np.ones(n, np.int64), scores, masks)
    uris = [f"file:///i{i}.png" for i in range(len(sizes))]
    batch = {
        "uri": np.array(uris, dtype=object),
        "image_id": np.array([image_id(u) for u in uris], dtype=object),
        "height": np.array([h for h, _ in sizes], dtype=np.int32),
        "width": np.array([w for _, w in sizes], dtype=np.int32),
        "error_code": np.array(["", "", "corrupt", "", ""], dtype=object),
        "error": np.array(["", "", "bad bytes", "", ""], dtype=object),
    }
    rows = image_rows(batch, "r", detections, ["__background__", "thing"])
    whole = encode_rows(rows)
    assert whole.column("instances").type.value_type == INSTANCE_STRUCT
    assert encode_rows(whole) is whole  # already encoded
    for start, stop in ((1, 3), (2, 5), (3, 4), (4, 5), (0, 0)):
        assert encode_rows(rows.slice(start, stop - start)).equals(whole.slice(start, stop - start))
    chunked = pa.concat_tables([rows.slice(0, 2), rows.slice(2)])
    assert chunked.column("instances").num_chunks == 2
    assert encode_rows(chunked).equals(whole)
    _, instances = split_tables(rows.slice(3))  # image 3 has no detections, image 4 three
    by_rank = full_masks(detections[4])[np.argsort(-detections[4].scores, kind="stable")]
    assert instances.num_rows == 3
    for row in instances.to_pylist():
        mask = decode_mask(row["mask_rle"], *sizes[4]).astype(bool)
        assert np.array_equal(mask, by_rank[row["instance_id"]])


def test_cpu_tasks_never_import_torch() -> None:
    """What CPU tasks unpickle (the steps, the writer, the pipeline's sink) imports no torch:
    it would cost every CPU worker ~450 MB and seconds of start-up."""
    code = (
        "import sys, segpipe.job.pipeline, segpipe.job.stages, segpipe.job.writer, "
        "segpipe.job.inputs, segpipe.job.runs; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_load_batch_decodes_large_images_at_the_model_scale(tmp_path: Path) -> None:
    """With the model's sizes, a large image's pixels come at the model's input size while its
    row keeps the full-resolution size; small ones, and --full-resolution, are untouched."""
    from segpipe.core.decode import model_input_size

    large, small = tmp_path / "large.jpg", tmp_path / "small.png"
    sample_image(1, (1200, 900)).save(large, format="JPEG")
    sample_image(2, (120, 80)).save(small, format="PNG")
    batch = {"uri": np.array([large.as_uri(), small.as_uri()], dtype=object)}
    fit = (SMALL["min_size"], SMALL["max_size"])
    loaded = load_batch(batch, DecodeConfig(), fit=fit)
    by_uri = {u: i for i, u in enumerate(loaded["uri"])}
    i, j = by_uri[large.as_uri()], by_uri[small.as_uri()]
    assert (loaded["width"][i], loaded["height"][i]) == (1200, 900)
    assert loaded["pixels"][i].shape == (*model_input_size(900, 1200, *fit), 3)
    assert loaded["pixels"][j].shape == (80, 120, 3)  # at or below the model's input size
    whole = load_batch(batch, DecodeConfig(full_resolution=True), fit=fit)
    assert sorted(p.shape for p in whole["pixels"]) == [(80, 120, 3), (900, 1200, 3)]


def test_decode_task_memory_follows_the_model_input() -> None:
    from segpipe.config import TileConfig
    from segpipe.job.stages import ENCODED_BYTES_PER_IMAGE, load_batch_memory, load_rows

    decode = DecodeConfig(max_pixels=24_000_000)
    fast = load_batch_memory(16, decode, (800, 1333))
    assert fast == 16 * (3 * 800 * 1333 + ENCODED_BYTES_PER_IMAGE) + 2 * 3 * 24_000_000
    full = load_batch_memory(16, DecodeConfig(max_pixels=24_000_000, full_resolution=True), None)
    assert full == 16 * (3 * 24_000_000 + ENCODED_BYTES_PER_IMAGE) > 4 * fast
    # A tiled run: one image a task (and a model call), held three times, Pillow's copy.
    tiling = TileConfig(tile=512, tile_max_pixels=400_000_000)
    assert load_rows(16, tiling) == 1 and load_rows(16, TileConfig()) == 16
    tiled = load_batch_memory(1, decode, (800, 1333), tiling)
    assert tiled == 4 * 3 * 400_000_000 + ENCODED_BYTES_PER_IMAGE


def manifest_rows(extras: pa.Table, uris: list[str]) -> pa.Table:
    """Input rows as the job's first steps make them from a manifest's batch."""
    batch = extras.add_column(0, "uri", [uris])
    return with_image_ids(prepare_manifest_batch(batch, "uri", extras.schema))


def test_manifest_columns_come_back_with_their_types() -> None:
    """Extra columns packed at the read, carried through numpy batches as Ray gives them to
    load_batch, come out of image_rows with the manifest's types, nulls as nulls, in batches
    where a column is all null too (Ray's own conversion would give float64 with NaN for
    the ints, drop the time zone, and null-typed columns)."""
    import datetime as dt

    n = 8
    extras = pa.table(
        {
            "n": pa.array([None if i % 3 == 0 else 2**60 + i for i in range(n)], pa.int64()),
            "at": pa.array(
                [None if i < 2 else dt.datetime(2024, 1, 1, i, tzinfo=dt.UTC) for i in range(n)],
                pa.timestamp("ms", tz="America/New_York"),
            ),
            "note": pa.array([None if i < 4 else f"note {i}" for i in range(n)]),
        }
    )
    uris = [f"  /nowhere/{i}.png " if i else "" for i in range(n)]  # one blank: dropped
    rows = distinct_images(manifest_rows(extras, uris))
    assert rows.num_rows == n - 1 and rows.column(EXTRAS_COLUMN).type == pa.binary()
    numpy_batch = {
        name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names
    }
    loaded = load_batch(numpy_batch, DecodeConfig())
    tables = []
    for start in range(0, n - 1, 2):  # batches of two: "note" is all null in the first two
        batch = {k: v[start : start + 2] for k, v in loaded.items()}
        table = image_rows(batch, "r", {}, ["__background__"], extras=extras.schema)
        assert table.select(extras.column_names).schema == extras.schema
        tables.append(table)
    got = pa.concat_tables(tables).sort_by("uri")
    want = extras.slice(1).add_column(0, "uri", [[f"file:///nowhere/{i}.png" for i in range(1, n)]])
    assert got.select(["uri", *extras.column_names]).to_pylist() == want.sort_by("uri").to_pylist()
    assert EXTRAS_COLUMN not in got.column_names
    with pytest.raises(ValueError, match="schema"):
        image_rows(batch, "r", {}, ["__background__"])


def test_distinct_images_keeps_one_row_per_image_whatever_the_order() -> None:
    extras = pa.table({"camera": ["b", "a", "c", "d", "e", "a"]})
    uris = ["/x/1.png", "/x/1.png", "file:///x/1.png", "/x/2.png", "/x/3.png", "/x/3.png"]
    rows = manifest_rows(extras, uris)
    rng = np.random.default_rng(0)
    results = [
        distinct_images(rows.take(pa.array(rng.permutation(rows.num_rows)))).sort_by("uri")
        for _ in range(5)
    ]
    assert all(r.equals(results[0]) for r in results)
    kept = results[0]
    assert kept.column("uri").to_pylist() == ["/x/1.png", "/x/2.png", "/x/3.png"]
    assert kept.column(COPIES_COLUMN).to_pylist() == [3, 1, 2]
    # Of equal URIs as written, the first by the extra values: camera "a" for both.
    assert kept.column(EXTRAS_COLUMN)[0] == rows.column(EXTRAS_COLUMN)[1]
    assert kept.column(EXTRAS_COLUMN)[2] == rows.column(EXTRAS_COLUMN)[5]
    dropped, duplicates = take_copies(kept)
    assert duplicates == 3 and COPIES_COLUMN not in dropped.column_names
    assert take_copies(dropped) == (dropped, 0)
    empty = distinct_images(rows.slice(0, 0))
    assert empty.num_rows == 0 and empty.column(COPIES_COLUMN).type == pa.int32()
