"""DuckDB over an output: the views ``images`` and ``instances``, local or on object storage.

DuckDB's own ``httpfs`` extension is downloaded on first use, which machines without internet
can't do; segpipe registers the output's fsspec filesystem with DuckDB instead, so the same
credentials and endpoint settings (``AWS_ENDPOINT_URL``, profiles, roles) apply as for the job.

The connection also has two macros (the same expressions work in any engine):
``box_area(box_x0, box_y0, box_x1, box_y1)`` = ``(box_x1 - box_x0) * (box_y1 - box_y0)``
and ``image_fraction(mask_area, image_width, image_height)`` = the share of the image the
mask covers; and the mask functions of :mod:`segpipe.analytics.mask_sql` (``mask_iou``,
``mask_intersection``, ``mask_area``, ``mask_bbox``). :func:`masks` turns a query result
into binary masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from segpipe import layout
from segpipe.analytics.mask_sql import register_duckdb
from segpipe.core.encode import decode_mask
from segpipe.io import fs_root
from segpipe.layout import TABLES
from segpipe.records import check_schema_versions

MACROS = (
    "CREATE OR REPLACE MACRO box_area(x0, y0, x1, y1) AS (x1 - x0) * (y1 - y0)",
    "CREATE OR REPLACE MACRO image_fraction(area, width, height) AS "
    "area / (CAST(width AS BIGINT) * height)",
)


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with ``images`` and ``instances`` views over ``output``; a
    :class:`~segpipe.schema.SchemaVersionError` if a run there has tables of a schema major
    version this segpipe does not know."""
    output = output.rstrip("/")
    fs, root = fs_root(output)
    check_schema_versions(output)  # the run records: one small file per run
    con = duckdb.connect()
    if "://" in output and not output.startswith("file://"):
        con.register_filesystem(fs)
        base = output
    else:
        base = root
    for view in TABLES:
        if not fs.exists(layout.table(root, view)):
            raise FileNotFoundError(f"no {view} table under {output}")
        pattern = f"{layout.table(base, view)}/**/*.parquet".replace("'", "''")
        # hive_types_autocast=false: partition values stay strings (a run id such as
        # "2024" must not turn into an integer column).
        con.sql(
            f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{pattern}', "
            "hive_partitioning=true, hive_types_autocast=false, union_by_name=true)"
        )
    for macro in MACROS:
        con.execute(macro)
    register_duckdb(con)
    return con


def masks(result: Any) -> Iterator[np.ndarray]:
    """The binary masks (bool ``(image_height, image_width)``) of a query result's rows, in
    order. ``result`` needs the columns ``mask_rle``, ``image_height`` and ``image_width``
    and may be a DuckDB relation, an Arrow table or record batch reader, or an iterable of
    dicts. Decodes one row at a time, so a large result never sits in memory as masks."""
    if isinstance(result, duckdb.DuckDBPyRelation):
        result = result.to_arrow_reader()
    if isinstance(result, pa.Table | pa.RecordBatchReader):
        batches = result.to_batches() if isinstance(result, pa.Table) else result
        for batch in batches:
            for row in batch.select(["mask_rle", "image_height", "image_width"]).to_pylist():
                yield _mask(row)
        return
    for row in result:
        yield _mask(row)


def _mask(row: Any) -> np.ndarray:
    return decode_mask(row["mask_rle"], int(row["image_height"]), int(row["image_width"])) > 0


def pick_run(con: duckdb.DuckDBPyConnection, run_id: str | None) -> str:
    """The run to read: ``run_id`` if the output holds it, else the output's only run."""
    runs = [r for (r,) in con.execute("SELECT DISTINCT run_id FROM images ORDER BY 1").fetchall()]
    if run_id is not None:
        if run_id not in runs:
            raise ValueError(f"the output holds no run {run_id!r} (runs: {', '.join(runs)})")
        return run_id
    if len(runs) != 1:
        raise ValueError(
            f"the output holds {len(runs)} runs ({', '.join(runs) or 'none'}); pick one with "
            "--run-id"
        )
    return str(runs[0])


def iter_rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()
) -> Iterator[tuple[Any, ...]]:
    """The rows of a query, fetched 10,000 at a time rather than all at once."""
    cursor = con.execute(sql, list(params))
    while chunk := cursor.fetchmany(10_000):
        yield from chunk
