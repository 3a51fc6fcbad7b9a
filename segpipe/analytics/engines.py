"""The output tables in SQL engines other than DuckDB: DDL and Spark views, from the schemas.

The files of a table hold its columns except the partition columns, which live only in the
Hive-style folder names (``run_id=<id>/``, values percent-encoded). Every engine therefore
declares the partition columns separately, as strings. :func:`ddl` writes that declaration
from :mod:`segpipe.schema`, so it cannot drift from what the writer writes. Columns carried
from a manifest are not in the schema: add them to the DDL by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from segpipe import layout
from segpipe.analytics.mask_sql import FUNCTIONS
from segpipe.layout import TABLE_SCHEMAS, TABLES

ENGINES = ("athena", "trino", "bigquery", "spark")
SCHEMAS = TABLE_SCHEMAS
_Columns = Sequence[tuple[str, str]]  # (name, engine type)

_TYPES = {
    "athena": {
        pa.string(): "string",
        pa.int32(): "int",
        pa.int64(): "bigint",
        pa.float32(): "float",
    },
    "spark": {
        pa.string(): "STRING",
        pa.int32(): "INT",
        pa.int64(): "BIGINT",
        pa.float32(): "FLOAT",
    },
    "trino": {
        pa.string(): "varchar",
        pa.int32(): "integer",
        pa.int64(): "bigint",
        pa.float32(): "real",
    },
    "bigquery": {
        pa.string(): "STRING",
        pa.int32(): "INT64",
        pa.int64(): "INT64",
        pa.float32(): "FLOAT64",
    },
}


def ddl(
    engine: str,
    table: str,
    location: str,
    partition_by: Sequence[str] = ("run_id",),
    name: str | None = None,
) -> str:
    """``CREATE`` statement(s) for ``table`` (``images`` or ``instances``) of the output at
    ``location`` in ``engine``, named ``name`` (default: the table's name)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    schema = SCHEMAS[table]
    types = _TYPES[engine]
    folder = layout.table(location, table)
    parts = [c for c in partition_by if c in schema.names]
    columns = [(f.name, types[_stored(f.type)]) for f in schema if f.name not in parts]
    return _STATEMENTS[engine](name or table, folder, columns, parts)


def _stored(kind: pa.DataType) -> pa.DataType:
    """The type as Parquet stores it: a large string (64-bit offsets in memory) is a string."""
    return pa.string() if pa.types.is_large_string(kind) else kind


def _athena(name: str, folder: str, columns: _Columns, parts: Sequence[str]) -> str:
    partitioned = _partitioned_by([f"`{p}` string" for p in parts])
    clauses = [*partitioned, "STORED AS PARQUET", f"LOCATION '{folder}/';"]
    return _hive_table("CREATE EXTERNAL TABLE", name, columns, clauses, repair=bool(parts))


def _spark(name: str, folder: str, columns: _Columns, parts: Sequence[str]) -> str:
    partitioned = _partitioned_by([f"`{p}`" for p in parts])
    clauses = ["USING PARQUET", *partitioned, f"LOCATION '{folder}';"]
    columns = [*columns, *((p, "STRING") for p in parts)]
    return _hive_table("CREATE TABLE", name, columns, clauses, repair=bool(parts))


def _partitioned_by(declared: Sequence[str]) -> list[str]:
    return [f"PARTITIONED BY ({', '.join(declared)})"] if declared else []


def _hive_table(
    create: str, name: str, columns: _Columns, clauses: Sequence[str], repair: bool
) -> str:
    """Hive's dialect (Athena, Spark SQL): backquoted names, one clause a line, and, for a
    partitioned table, ``MSCK REPAIR TABLE`` to find the partitions."""
    cols = ",\n".join(f"  `{c}` {t}" for c, t in columns)
    return (
        f"{create} `{name}` (\n{cols}\n)\n"
        + "".join(f"{clause}\n" for clause in clauses)
        + (f"MSCK REPAIR TABLE `{name}`;  -- again after each run\n" if repair else "")
    )


def _trino(name: str, folder: str, columns: _Columns, parts: Sequence[str]) -> str:
    cols = ",\n".join(f"  {c} {t}" for c, t in [*columns, *((p, "varchar") for p in parts)])
    props = [f"external_location = '{folder}'", "format = 'PARQUET'"]
    if parts:
        props.append("partitioned_by = ARRAY[" + ", ".join(f"'{p}'" for p in parts) + "]")
    return (
        f"CREATE TABLE hive.segpipe.{name} (\n{cols}\n)\nWITH (\n  "
        + ",\n  ".join(props)
        + "\n);\n"
        + (
            f"CALL hive.system.sync_partition_metadata('segpipe', '{name}', 'ADD');"
            "  -- again after each run\n"
            if parts
            else ""
        )
    )


def _bigquery(name: str, folder: str, columns: _Columns, parts: Sequence[str]) -> str:
    cols = ",\n".join(f"  {c} {t}" for c, t in columns)
    part = ", ".join(f"{p} STRING" for p in parts)
    return (
        f"CREATE EXTERNAL TABLE segpipe.{name} (\n{cols}\n)\n"
        + (f"WITH PARTITION COLUMNS ({part})\n" if parts else "")
        + f"OPTIONS (\n  format = 'PARQUET',\n  uris = ['{folder}/*']"
        + (f",\n  hive_partition_uri_prefix = '{folder}'" if parts else "")
        + "\n);\n"
    )


# Each engine's statement, from the table's name, its folder, its file columns as
# (name, engine type) and its partition columns (strings, found in the folder names).
_STATEMENTS: dict[str, Callable[[str, str, _Columns, Sequence[str]], str]] = {
    "athena": _athena,
    "trino": _trino,
    "bigquery": _bigquery,
    "spark": _spark,
}


def spark_views(spark: Any, output: str) -> None:
    """Register the temporary views ``images`` and ``instances`` over ``output`` in a
    SparkSession, and the mask functions (:func:`spark_functions`). Partition columns stay
    strings when the session sets
    ``spark.sql.sources.partitionColumnTypeInference.enabled=false`` (recommended: a run id
    such as ``2024`` must not become a number)."""
    spark_functions(spark)
    for table in TABLES:
        path = layout.table(output, table)
        frame = spark.read.option("mergeSchema", "true").option("basePath", path).parquet(path)
        frame.createOrReplaceTempView(table)


def spark_functions(spark: Any) -> None:
    """Register :mod:`segpipe.analytics.mask_sql`'s functions (``mask_iou``,
        ``mask_intersection``, ``mask_area``, ``mask_bbox``) in a SparkSession as Arrow UDFs:
        Spark hands them Arrow batches of rows. The executors' Python (``PYSPARK_PYTHON``)
    needs segpipe installed."""
    from pyspark.sql.functions import arrow_udf

    for name, (function, _, _, returns) in FUNCTIONS.items():
        # Spark reads the kind of UDF from the type hints (pa.Array in, pa.Array out).
        spark.udf.register(name, arrow_udf(function, returns))  # type: ignore[call-overload]
