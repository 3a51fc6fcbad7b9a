"""Parquet output: the ``images`` and ``instances`` tables under one output URI.

Layout (Hive-style partitions, one folder level per partition column)::

    <output>/images/run_id=<run>/<file_stem>-0.parquet
    <output>/instances/run_id=<run>/<file_stem>-0.parquet

A partition column applies to each table that has it (``label`` partitions only
``instances``). File names are deterministic (``file_stem`` comes from the caller), so writing
the same unit of work twice replaces its files instead of adding copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import fsspec
import pyarrow as pa
import pyarrow.dataset as pds
from pyarrow.fs import FSSpecHandler, PyFileSystem

IMAGES_DIR = "images"
INSTANCES_DIR = "instances"


def arrow_filesystem(output: str) -> tuple[PyFileSystem, str]:
    """A pyarrow view of the fsspec filesystem of ``output``, and the path within it."""
    fs, root = fsspec.core.url_to_fs(output)
    return PyFileSystem(FSSpecHandler(fs)), root.rstrip("/")


def write_table(
    table: pa.Table,
    output: str,
    name: str,
    *,
    partition_by: Sequence[str],
    file_stem: str,
) -> list[str]:
    """Write ``table`` under ``<output>/<name>/``; returns the paths written."""
    filesystem, root = arrow_filesystem(output)
    columns = [c for c in partition_by if c in table.column_names]
    written: list[str] = []
    pds.write_dataset(
        table,
        base_dir=f"{root}/{name}",
        format="parquet",
        filesystem=filesystem,
        partitioning=columns or None,
        partitioning_flavor="hive" if columns else None,
        basename_template=f"{file_stem}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        file_visitor=lambda f: written.append(f.path),
        create_dir=True,
    )
    return written
