"""The output in SQL engines: DuckDB and Spark SQL give the same answers to the README's
queries, both prune partitions, and the DDL for other engines follows the schema."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from segpipe.analytics.engines import ENGINES, SCHEMAS, ddl, spark_views
from segpipe.analytics.query import connect, masks
from segpipe.cli import main
from segpipe.core.encode import decode_mask, encode_window
from tests.outputs import RUNS, coco_like_output

README = Path(__file__).parents[1] / "README.md"


def readme_queries() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Queries\n", 1)[1].split("\n### Masks and areas\n", 1)[0]
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", section, re.S)]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("sql") / "out")
    coco_like_output(out)
    return out


@pytest.fixture(scope="module")
def duck(output: str) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(output)
    yield con
    con.close()


@pytest.fixture(scope="module")
def spark(output: str) -> Iterator[Any]:
    if shutil.which("java") is None:
        if os.environ.get("SEGPIPE_CI"):
            pytest.fail("Spark needs Java (17), which CI must have (SEGPIPE_CI is set)")
        pytest.skip("Spark needs Java 17 on PATH")
    pyspark_sql = pytest.importorskip("pyspark.sql")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # runs the mask functions
    session = (
        pyspark_sql.SparkSession.builder.master("local[1]")
        .appName("segpipe-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    spark_views(session, output)
    yield session
    session.stop()


def test_the_readme_has_the_queries_users_run() -> None:
    queries = readme_queries()
    assert len(queries) >= 13
    joined = "\n".join(queries)
    for needle in ("GROUP BY label", "label = 'person'", "percentile_cont", "error_code",
                   "LEFT JOIN instances", "'r50-fpn-v2'", "label = 'dog'", "mask_iou(",
                   "mask_intersection(", "mask_area(", "mask_bbox("):  # fmt: skip
        assert needle in joined


@pytest.mark.parametrize("number", range(len(readme_queries())))
def test_readme_query_agrees_in_duckdb_and_spark(
    number: int, duck: duckdb.DuckDBPyConnection, spark: Any
) -> None:
    sql = readme_queries()[number]
    ours = duck.execute(sql).fetchall()
    theirs = [tuple(row) for row in spark.sql(sql).collect()]
    assert ours, f"query {number} returns nothing on the fixture:\n{sql}"
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if isinstance(x, float) or isinstance(y, float):
                assert math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9), (sql, a, b)
            else:
                assert x == y, (sql, a, b)


def test_both_engines_prune_partitions(duck: duckdb.DuckDBPyConnection, spark: Any) -> None:
    sql = f"SELECT count(*) FROM instances WHERE run_id = '{RUNS[0]}'"
    plan = duck.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    assert re.search(r"Total Files Read: 1\b", plan), plan
    everything = duck.execute("EXPLAIN ANALYZE SELECT count(*) FROM instances").fetchall()[0][1]
    assert re.search(r"Total Files Read: 2\b", everything)

    frame = spark.sql(sql)
    assert frame.collect()[0][0] == duck.execute(sql).fetchall()[0][0]
    executed = frame._jdf.queryExecution().executedPlan().toString()
    assert re.search(rf"PartitionFilters: \[.*\(run_id#\d+ = {RUNS[0]}\)", executed), executed


def test_both_engines_take_lookups_by_image_id_to_the_parquet_reader(
    duck: duckdb.DuckDBPyConnection, spark: Any
) -> None:
    """``mask_rle``, an Arrow large string in memory, is a plain string to both engines; and
    both hand ``image_id = ...`` to their Parquet reader, which skips row groups by their
    statistics (tests/test_lookups.py measures DuckDB doing it on files of many groups)."""
    types = {row[0]: row[1] for row in duck.execute("DESCRIBE instances").fetchall()}
    assert types["mask_rle"] == "VARCHAR"
    ((wanted,),) = duck.execute("SELECT max(image_id) FROM instances").fetchall()
    sql = f"SELECT image_id, instance_id, mask_rle FROM instances WHERE image_id = '{wanted}'"
    ours = duck.execute(sql).fetchall()
    frame = spark.sql(sql)
    assert dict(frame.dtypes)["mask_rle"] == "string"
    assert sorted(tuple(r) for r in frame.collect()) == sorted(ours) and ours
    plan = duck.execute(f"EXPLAIN ANALYZE {sql}").fetchall()[0][1]
    assert f"image_id = '{wanted}'" in plan.split("Filters:", 1)[1]  # in the Parquet scan
    executed = frame._jdf.queryExecution().executedPlan().toString()
    assert re.search(rf"PushedFilters: \[.*EqualTo\(image_id,{wanted}\)", executed), executed
    # A lookup by URI goes through its image_id, computed in SQL (schema.image_id).
    uris = duck.execute("SELECT DISTINCT uri FROM images WHERE image_id = ?", [wanted])
    ((uri,),) = uris.fetchall()
    by_uri = "SELECT image_id, instance_id, mask_rle FROM instances WHERE image_id = {}"
    ours_by_uri = duck.execute(by_uri.format(f"left(sha256('{uri}'), 32)")).fetchall()
    frame = spark.sql(by_uri.format(f"substr(sha2('{uri}', 256), 1, 32)"))
    assert sorted(ours_by_uri) == sorted(tuple(r) for r in frame.collect()) == sorted(ours)
    executed = frame._jdf.queryExecution().executedPlan().toString()
    assert re.search(rf"PushedFilters: \[.*EqualTo\(image_id,{wanted}\)", executed), executed


def test_spark_ddl_reads_the_same_rows(
    output: str, duck: duckdb.DuckDBPyConnection, spark: Any
) -> None:
    for table in SCHEMAS:
        for statement in ddl("spark", table, output, name=f"t_{table}").split(";"):
            statement = statement.split("--")[0].strip()
            if statement:
                spark.sql(statement)
        count = spark.sql(f"SELECT run_id, count(*) FROM t_{table} GROUP BY run_id ORDER BY 1")
        expected = duck.execute(f"SELECT run_id, count(*) FROM {table} GROUP BY 1 ORDER BY 1")
        assert [tuple(r) for r in count.collect()] == expected.fetchall()


def test_ddl_follows_the_schema_and_the_readme_shows_it() -> None:
    readme = README.read_text()
    for engine in ENGINES:
        for table, schema in SCHEMAS.items():
            text = ddl(engine, table, "s3://bucket/segpipe-out")
            for field in schema:
                assert re.search(rf"\b{field.name}\b", text), (engine, table, field.name)
            assert "PARTITION" in text.upper()
    for engine, location in (("athena", "s3"), ("trino", "s3"), ("bigquery", "gs")):
        assert ddl(engine, "instances", f"{location}://bucket/segpipe-out") in readme
    with pytest.raises(ValueError, match="unknown engine"):
        ddl("mysql", "images", "s3://b/o")


def test_ddl_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ddl", "--engine", "trino", "--location", "s3://b/out"]) == 0
    printed = capsys.readouterr().out
    assert "hive.segpipe.images" in printed and "hive.segpipe.instances" in printed


def test_mask_helper_and_macros(duck: duckdb.DuckDBPyConnection) -> None:
    sql = (
        "SELECT uri, mask_rle, image_height, image_width, mask_area, box_x0, box_y0, box_x1, "
        f"box_y1 FROM instances WHERE run_id = '{RUNS[0]}' ORDER BY score DESC LIMIT 7"
    )
    rows = duck.sql(sql).to_arrow_table().to_pylist()
    from_relation = list(masks(duck.sql(sql)))
    from_dicts = list(masks(rows))
    assert len(from_relation) == len(rows) == 7
    for row, a, b in zip(rows, from_relation, from_dicts, strict=True):
        assert a.dtype == bool and a.shape == (row["image_height"], row["image_width"])
        assert np.array_equal(a, b) and a.sum() == row["mask_area"]
        assert np.array_equal(a, decode_mask(row["mask_rle"], a.shape[0], a.shape[1]) > 0)
        ys, xs = np.nonzero(a)
        assert row["box_x0"] <= xs.min() and xs.max() < row["box_x1"]
        assert row["box_y0"] <= ys.min() and ys.max() < row["box_y1"]
    check = duck.execute(
        "SELECT bool_and(box_area(box_x0, box_y0, box_x1, box_y1) = "
        "(box_x1 - box_x0) * (box_y1 - box_y0)), bool_and(image_fraction(mask_area, "
        "image_width, image_height) BETWEEN 0 AND 1) FROM instances"
    ).fetchall()[0]
    assert check == (True, True)


PAIRS = """
SELECT a.mask_rle AS rle_a, b.mask_rle AS rle_b, a.image_height AS h, a.image_width AS w,
       a.image_id, a.instance_id AS ia, b.instance_id AS ib
FROM instances a JOIN instances b ON a.image_id = b.image_id AND a.run_id = b.run_id
WHERE a.run_id = 'r50-fpn'
"""
FUNCTIONS = (
    "mask_iou(rle_a, rle_b, h, w), mask_intersection(rle_a, rle_b, h, w), "
    "mask_area(rle_a, h, w), mask_bbox(rle_a, h, w).x0, mask_bbox(rle_a, h, w).y0, "
    "mask_bbox(rle_a, h, w).x1, mask_bbox(rle_a, h, w).y1"
)


def test_mask_functions_agree_with_the_decoded_masks_in_both_engines(
    duck: duckdb.DuckDBPyConnection, spark: Any
) -> None:
    """Every pair of masks of an image (each with itself too): the SQL functions against
    numpy on the decoded masks, in DuckDB and in Spark; NULLs give NULL."""
    sql = f"SELECT rle_a, rle_b, h, w, {FUNCTIONS} FROM ({PAIRS}) ORDER BY image_id, ia, ib"
    ours = duck.sql(sql).fetchall()
    assert len(ours) > 300  # more than one pycocotools slice of 255
    assert ours == [tuple(r) for r in spark.sql(sql).collect()]
    pairs = [row[:4] for row in ours]
    for (rle_a, rle_b, h, w), got in zip(pairs, (row[4:] for row in ours), strict=True):
        a, b = decode_mask(rle_a, h, w) > 0, decode_mask(rle_b, h, w) > 0
        inter, union = int((a & b).sum()), int((a | b).sum())
        ys, xs = np.nonzero(a)
        expected = (inter / union, inter, int(a.sum()), xs.min(), ys.min(), xs.max() + 1)
        assert got[:6] == pytest.approx(expected, rel=1e-12) and got[6] == ys.max() + 1
    rle, _, h, w = pairs[0]
    empty, _ = encode_window(np.zeros((0, 0), dtype=bool), 0, 0, h, w)
    nulls = (
        f"SELECT mask_iou(NULL, '{rle}', {h}, {w}), mask_intersection('{rle}', NULL, {h}, {w}),"
        f" mask_area('{rle}', NULL, {w}), mask_bbox(NULL, {h}, {w}),"
        f" mask_bbox('{empty}', {h}, {w}), mask_area('{empty}', {h}, {w}),"
        f" mask_iou('{empty}', '{empty}', {h}, {w})"
    )
    expected = [(None, None, None, None, None, 0, 0.0)]
    assert duck.sql(nulls).fetchall() == expected
    assert [tuple(r) for r in spark.sql(nulls).collect()] == expected


def test_the_mask_queries_find_what_the_fixture_holds(duck: duckdb.DuckDBPyConnection) -> None:
    """The README's mask queries against what tests/outputs.py put there on purpose: one
    person twice in the first image, a dog inside a car in the second."""
    by_first_column = {q.split("\n", 1)[0]: q for q in readme_queries() if "mask_" in q}
    duplicates = next(q for q in by_first_column.values() if "AS duplicate" in q)
    assert [r[:2] for r in duck.sql(duplicates).fetchall()] == [
        ("s3://photos/2026/0000.jpg", "person")
    ]
    inside = next(q for q in by_first_column.values() if "AS share_inside" in q)
    ((uri, _, _, share),) = duck.sql(inside).fetchall()
    assert uri == "s3://photos/2026/0001.jpg" and share == 1.0
    relabelled = next(q for q in by_first_column.values() if "label_after" in q)
    rows = duck.sql(relabelled).fetchall()
    assert rows and all(r[3] != r[4] and r[5] >= 0.5 for r in rows)
