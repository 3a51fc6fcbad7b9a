"""The batch steps chained in-process: every input accounted for, nested rows flattened."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from segpipe.config import DecodeConfig, ModelConfig
from segpipe.encode import ImageRef, instances_table
from segpipe.model import Segmenter
from segpipe.samples import sample_files
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, image_id
from segpipe.stages import Segment, load_batch, split_tables
from segpipe.writer import write_table

SMALL = dict(min_size=96, max_size=160, max_detections=8)


@pytest.fixture(scope="module")
def weights(random_checkpoint: Path) -> str:
    return str(random_checkpoint)


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    uris = []
    for name, data in sample_files(3, seed=7):
        (tmp_path / name).write_bytes(data)
        uris.append((tmp_path / name).as_uri())
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return [*uris, (tmp_path / "bad.jpg").as_uri(), (tmp_path / "missing.png").as_uri()]


def test_load_batch_accounts_for_every_uri(inputs: list[str]) -> None:
    batch = {"uri": np.array(inputs, dtype=object), "source": np.array(list("abcde"), object)}
    loaded = load_batch(batch, DecodeConfig())
    assert list(loaded["status"]) == ["ok", "ok", "ok", "error", "error"]
    assert list(loaded["error_code"][3:]) == ["corrupt", "not_found"]
    assert "missing.png" in loaded["error"][4]
    assert list(loaded["source"]) == list("abcde")
    assert [p.shape[2] for p in loaded["pixels"]] == [3] * 5
    assert list(loaded["image_id"]) == [image_id(u) for u in inputs]


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
        for u, p in zip(inputs[:3], pixels, strict=True)
    ]
    expected = instances_table(refs, segmenter(pixels), segmenter.categories)
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
