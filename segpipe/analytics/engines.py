"""The output tables in SQL engines other than DuckDB: DDL and Spark views, from the schemas.

The files of a table hold its columns except the partition columns, which live only in the
Hive-style folder names (``run_id=<id>/``, values percent-encoded). Every engine therefore
declares the partition columns separately, as strings. :func:`ddl` writes that declaration
from :mod:`segpipe.schema`, so it cannot drift from what the writer writes. Columns carried
from a manifest are not in the schema: add them to the DDL by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from segpipe import layout
from segpipe.layout import IMAGES_DIR, INSTANCES_DIR, TABLES
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA

ENGINES = ("athena", "trino", "bigquery", "spark")
SCHEMAS = {IMAGES_DIR: IMAGES_SCHEMA, INSTANCES_DIR: INSTANCES_SCHEMA}

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
    name = name or table
    folder = layout.table(location.rstrip("/"), table)
    parts = [c for c in partition_by if c in schema.names]
    columns = [(f.name, types[f.type]) for f in schema if f.name not in parts]
    if engine == "athena":
        cols = ",\n".join(f"  `{c}` {t}" for c, t in columns)
        part = ", ".join(f"`{c}` string" for c in parts)
        return (
            f"CREATE EXTERNAL TABLE `{name}` (\n{cols}\n)\n"
            + (f"PARTITIONED BY ({part})\n" if parts else "")
            + f"STORED AS PARQUET\nLOCATION '{folder}/';\n"
            + (f"MSCK REPAIR TABLE `{name}`;  -- again after each run\n" if parts else "")
        )
    if engine == "spark":
        cols = ",\n".join(f"  `{c}` {t}" for c, t in [*columns, *((p, "STRING") for p in parts)])
        part = ", ".join(f"`{c}`" for c in parts)
        return (
            f"CREATE TABLE `{name}` (\n{cols}\n)\nUSING PARQUET\n"
            + (f"PARTITIONED BY ({part})\n" if parts else "")
            + f"LOCATION '{folder}';\n"
            + (f"MSCK REPAIR TABLE `{name}`;  -- again after each run\n" if parts else "")
        )
    if engine == "trino":
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
    cols = ",\n".join(f"  {c} {t}" for c, t in columns)
    part = ", ".join(f"{p} STRING" for p in parts)
    return (
        f"CREATE EXTERNAL TABLE segpipe.{name} (\n{cols}\n)\n"
        + (f"WITH PARTITION COLUMNS ({part})\n" if parts else "")
        + f"OPTIONS (\n  format = 'PARQUET',\n  uris = ['{folder}/*']"
        + (f",\n  hive_partition_uri_prefix = '{folder}'" if parts else "")
        + "\n);\n"
    )


def spark_views(spark: Any, output: str) -> None:
    """Register the temporary views ``images`` and ``instances`` over ``output`` in a
    SparkSession. Partition columns stay strings when the session sets
    ``spark.sql.sources.partitionColumnTypeInference.enabled=false`` (recommended: a run id
    such as ``2024`` must not become a number)."""
    for table in TABLES:
        path = layout.table(output.rstrip("/"), table)
        frame = spark.read.option("mergeSchema", "true").option("basePath", path).parquet(path)
        frame.createOrReplaceTempView(table)
