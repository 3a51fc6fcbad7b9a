"""DuckDB over an output: the views ``images`` and ``instances``, local or on object storage.

DuckDB's own ``httpfs`` extension is downloaded on first use, which machines without internet
can't do; segpipe registers the output's fsspec filesystem with DuckDB instead, so the same
credentials and endpoint settings (``AWS_ENDPOINT_URL``, profiles, roles) apply as for the job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import fsspec

from segpipe.writer import IMAGES_DIR, INSTANCES_DIR


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with ``images`` and ``instances`` views over ``output``."""
    output = output.rstrip("/")
    fs, root = fsspec.core.url_to_fs(output)
    con = duckdb.connect()
    if "://" in output and not output.startswith("file://"):
        con.register_filesystem(fs)
        base = output
    else:
        base = root
    for view in (IMAGES_DIR, INSTANCES_DIR):
        if not fs.exists(f"{root}/{view}"):
            raise FileNotFoundError(f"no {view} table under {output}")
        pattern = f"{base}/{view}/**/*.parquet".replace("'", "''")
        # hive_types_autocast=false: partition values stay strings (a run id such as
        # "2024" must not turn into an integer column).
        con.sql(
            f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{pattern}', "
            "hive_partitioning=true, hive_types_autocast=false, union_by_name=true)"
        )
    return con


def iter_rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()
) -> Iterator[tuple[Any, ...]]:
    """The rows of a query, fetched 10,000 at a time rather than all at once."""
    cursor = con.execute(sql, list(params))
    while chunk := cursor.fetchmany(10_000):
        yield from chunk
