"""How a unit's rows land in Parquet: files bounded in bytes, rows sorted by image_id, and
row groups that let a lookup by image_id read one row group of each file (DuckDB shows it).

The rows are generated straight into the per-image layout the write tasks receive (encoded
instances nested in their image's row), with RLE strings of random text: the writer neither
decodes masks nor cares what they hold, and thousands of images take a fraction of a second.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segpipe.analytics.query import connect
from segpipe.analytics.render import render
from segpipe.job.commit import units
from segpipe.job.stages import INSTANCE_STRUCT, split_tables
from segpipe.job.writer import ROWS_PER_GROUP, row_bytes, write_rows
from segpipe.layout import IMAGES_DIR, INSTANCES_DIR
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, STATUS_OK, image_id

RUN = "lookups"
LABELS = np.array(["person", "car", "dog", "cat"], dtype=object)


def unit_rows(
    run_id: str,
    images: int,
    per_image: int,
    seed: int,
    rle: tuple[int, int] = (20, 120),
    long_rle: int = 0,
) -> pa.Table:
    """Per-image rows of ``images`` images with 0 to ``2 * per_image`` instances each, their
    ``mask_rle`` random text of ``rle`` (min, max) characters; the first instance of the first
    image that has one gets ``long_rle`` characters instead, when given. The URIs name no file."""
    rng = np.random.default_rng(seed)
    uris = [f"file:///nowhere/{run_id}/{seed}/{k:05d}.jpg" for k in range(images)]
    counts = rng.integers(0, 2 * per_image + 1, size=images).astype(np.int32)
    n = int(counts.sum())
    lengths = rng.integers(rle[0], rle[1] + 1, size=n)
    if long_rle and n:
        lengths[0] = long_rle
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    text = rng.integers(ord("0"), ord("o"), size=int(offsets[-1]), dtype=np.uint8)
    rles = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
    label_ids = rng.integers(0, len(LABELS), size=n).astype(np.int32)
    nested = {
        "instance_id": pa.array(np.concatenate([np.arange(c, dtype=np.int32) for c in counts])),
        "label_id": pa.array(label_ids),
        "label": pa.array(LABELS[label_ids], type=pa.string()),
        "mask_rle": rles,
        "mask_area": pa.array(lengths.astype(np.int64)),
    }
    for name in ("score", "box_x0", "box_y0", "box_x1", "box_y1"):
        nested[name] = pa.array(rng.random(n, dtype=np.float32))
    struct = pa.StructArray.from_arrays(
        [nested[f.name] for f in INSTANCE_STRUCT], fields=list(INSTANCE_STRUCT)
    )
    starts = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
    columns = {
        "run_id": [run_id] * images,
        "image_id": [image_id(u) for u in uris],
        "uri": uris,
        "width": np.full(images, 64, np.int32),
        "height": np.full(images, 48, np.int32),
        "status": [STATUS_OK] * images,
        "error_code": pa.nulls(images, pa.string()),
        "error": pa.nulls(images, pa.string()),
        "num_instances": counts,
        "tiles": np.zeros(images, np.int32),
    }
    table = pa.table(columns, schema=IMAGES_SCHEMA)
    return table.append_column("instances", pa.ListArray.from_arrays(starts, struct))


def parquet_files(output: Path, table: str) -> list[Path]:
    return sorted(output.glob(f"{table}/**/*.parquet"))


def test_a_unit_over_the_byte_bound_is_written_as_several_files(tmp_path: Path) -> None:
    bound = 8 * 1024
    rows = unit_rows("bytes", 100, 2, seed=2, rle=(100, 400), long_rle=3 * bound)
    images, instances = split_tables(rows)
    assert images.nbytes > bound and instances.nbytes > 4 * bound
    output = tmp_path / "out"
    counts = write_rows(rows, str(output), partition_by=["run_id"], max_file_bytes=bound)

    files = {t: parquet_files(output, t) for t in (IMAGES_DIR, INSTANCES_DIR)}
    assert len(files[IMAGES_DIR]) >= 2 and len(files[INSTANCES_DIR]) >= 5
    # One unit, one commit marker naming every file; names are <stem>-<k>-0.parquet.
    (unit,) = units(str(output), "bytes")
    assert counts.files == len(files[IMAGES_DIR]) + len(files[INSTANCES_DIR])
    for table, paths in files.items():
        assert sorted(unit.files[table]) == sorted(str(p.relative_to(output)) for p in paths)
        assert sorted(int(p.name.split("-")[2]) for p in paths) == list(range(len(paths)))
        assert all(p.name.startswith(unit.stem) and p.name.endswith("-0.parquet") for p in paths)

    expected = {IMAGES_DIR: images, INSTANCES_DIR: instances}
    bytes_of: dict[str, dict[str, int]] = {}  # table -> image id -> its rows' Arrow bytes
    for table, rows_of in expected.items():
        sizes = bytes_of.setdefault(table, {})
        ids = rows_of.column("image_id").to_pylist()
        for iid, size in zip(ids, row_bytes(rows_of).tolist(), strict=True):
            sizes[iid] = sizes.get(iid, 0) + size
    alone = 0
    for table, paths in files.items():
        seen: set[str] = set()
        for path in paths:
            ids = pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
            assert ids == sorted(ids)
            assert not seen & set(ids), "an image's rows are split between files"
            seen |= set(ids)
            rows_bytes = sum(bytes_of[table][i] for i in set(ids))
            data = pq.ParquetFile(path).metadata
            encoded = sum(
                data.row_group(g).column(c).total_compressed_size
                for g in range(data.num_row_groups)
                for c in range(data.num_columns)
            )
            if len(set(ids)) > 1:
                # Within the bound: the rows' Arrow size, and their Parquet pages.
                assert rows_bytes <= bound and encoded <= bound, (path.name, rows_bytes)
            else:
                alone += rows_bytes > bound
        assert seen == set(expected[table].column("image_id").to_pylist())
    assert alone == 1  # the image whose one mask alone is over the bound: a file of its own

    # All rows read back exactly once, as they were.
    con = duckdb.connect()
    back = con.sql(
        f"SELECT {', '.join(INSTANCES_SCHEMA.names)} FROM read_parquet("
        f"'{output}/instances/**/*.parquet', hive_partitioning=true, hive_types_autocast=false) "
        "ORDER BY image_id, instance_id"
    ).to_arrow_table()
    want = instances.sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
    assert back.num_rows == counts.instances == instances.num_rows
    assert back.to_pylist() == want.to_pylist()
    (n,) = con.execute(
        f"SELECT count(DISTINCT image_id) FROM '{output}/images/**/*.parquet'"
    ).fetchall()[0]
    assert n == counts.images == 100

    # A retry of the same unit leaves the same files; written anew, it gets the same names.
    again = write_rows(rows, str(output), partition_by=["run_id"], max_file_bytes=bound)
    assert again == counts
    assert {t: parquet_files(output, t) for t in files} == files
    other = tmp_path / "other"
    write_rows(rows, str(other), partition_by=["run_id"], max_file_bytes=bound)
    for table, paths in files.items():
        names = [p.relative_to(output) for p in paths]
        assert [p.relative_to(other) for p in parquet_files(other, table)] == names


@pytest.fixture(scope="module")
def looked_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    """An output of two units of 3,000 images (~20 instances each) at the default row-group
    sizes, and the images rows."""
    output = tmp_path_factory.mktemp("lookups") / "out"
    images = []
    for seed in (0, 1):
        rows = unit_rows(RUN, 3000, 20, seed=seed)
        write_rows(rows, str(output), partition_by=["run_id"])
        images.append(rows.drop_columns(["instances"]))
    return output, pa.concat_tables(images)


def groups(con: duckdb.DuckDBPyConnection, output: Path, table: str) -> list[tuple[str, ...]]:
    """(file, row group, rows, min image_id, max image_id) of each row group of ``table``."""
    return con.execute(
        "SELECT file_name, row_group_id, row_group_num_rows, stats_min_value, stats_max_value "
        f"FROM parquet_metadata('{output}/{table}/**/*.parquet') "
        "WHERE path_in_schema = 'image_id' ORDER BY file_name, row_group_id"
    ).fetchall()


def scan(con: duckdb.DuckDBPyConnection, sql: str, params: list[object]) -> tuple[int, int, float]:
    """(row groups scanned, row groups in all, bytes read) from DuckDB's EXPLAIN ANALYZE."""
    ((_, plan),) = con.execute(f"EXPLAIN ANALYZE {sql}", params).fetchall()
    scanned = re.search(r"Row Groups Scanned: (\d+) / (\d+)", plan)
    read = re.search(r"Data Read:\s+([\d.]+) (bytes|kB|MB|GB)", plan)
    assert scanned and read, plan
    unit = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[read.group(2)]
    return int(scanned.group(1)), int(scanned.group(2)), float(read.group(1)) * unit


def test_a_lookup_by_image_id_reads_one_row_group_of_each_file(
    looked_up: tuple[Path, pa.Table],
) -> None:
    output, images = looked_up
    con = connect(str(output))
    meta = {t: groups(con, output, t) for t in (IMAGES_DIR, INSTANCES_DIR)}
    for table, rows in meta.items():
        files = {r[0] for r in rows}
        assert len(files) == 2
        assert {r[2] for r in rows if r[1] == 0} == {ROWS_PER_GROUP[table]}  # full groups
        assert len(rows) >= 2 * (3 if table == INSTANCES_DIR else 2)
        for file in files:  # sorted: the groups of a file follow each other in id order
            bounds = [(r[3], r[4]) for r in rows if r[0] == file]
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(bounds))

    # An image of the first unit whose id is strictly inside an instances row group (not one
    # whose rows straddle two groups).
    first = images.column("image_id").to_pylist()[:3000]
    inner = [i for i in sorted(first) for r in meta[INSTANCES_DIR] if r[1] == 1 and r[3] < i < r[4]]
    wanted = inner[len(inner) // 2]
    for table in (IMAGES_DIR, INSTANCES_DIR):
        # The row groups whose [min, max] covers the id: the one holding it in the first
        # unit's file, and at most one (holding other images) in the second unit's.
        covering = [r for r in meta[table] if r[3] <= wanted <= r[4]]
        assert len({r[0] for r in covering}) == len(covering) <= 2
        scanned, total, read = scan(con, f"SELECT * FROM {table} WHERE image_id = ?", [wanted])
        assert (scanned, total) == (len(covering), len(meta[table]))
        # What DuckDB read: about those row groups' share of the table, not all of it.
        _, _, read_all = scan(con, f"SELECT * FROM {table}", [])
        share = sum(r[2] for r in covering) / sum(r[2] for r in meta[table])
        assert read <= 1.2 * share * read_all + 50_000, (table, read, share, read_all)
        if table == INSTANCES_DIR:
            assert share < 0.35 and read < 0.35 * read_all

    expected = images.filter(pa.compute.equal(images.column("image_id"), wanted))
    (count,) = expected.column("num_instances").to_pylist()
    got = con.execute(
        "SELECT instance_id FROM instances WHERE image_id = ? ORDER BY instance_id", [wanted]
    ).fetchall()
    assert [i for (i,) in got] == list(range(count))
    con.close()


def test_render_reads_the_instances_of_all_its_images_at_once(
    looked_up: tuple[Path, pa.Table], tmp_path: Path
) -> None:
    output, images = looked_up
    con = connect(str(output))
    drawn = render(con, RUN, str(tmp_path / "gallery"), limit=40, min_score=0.0)
    by_id = dict(
        zip(
            images.column("image_id").to_pylist(),
            images.column("num_instances").to_pylist(),
            strict=True,
        )
    )
    assert [d.image_id for d in drawn] == sorted(by_id)[:40]
    assert [d.instances for d in drawn] == [by_id[d.image_id] for d in drawn]
    assert 0 in [d.instances for d in drawn] and all(d.file_name is None for d in drawn)
    assert (tmp_path / "gallery" / "index.html").exists()
    con.close()
