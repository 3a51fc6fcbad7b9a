"""Parquet output: the ``images`` and ``instances`` tables under one output URI.

Layout (Hive-style partitions, one folder level per partition column)::

    <output>/images/run_id=<run>/<file_stem>-0.parquet
    <output>/instances/run_id=<run>/<file_stem>-0.parquet

A partition column applies to each table that has it (``label`` partitions only
``instances``). File names are deterministic (``file_stem`` comes from the caller), so writing
the same unit of work twice replaces its files instead of adding copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from pyarrow.fs import FSSpecHandler, PyFileSystem

from segpipe.schema import STATUS_OK
from segpipe.stages import split_tables

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


@dataclass
class WriteCounts:
    """What one write (or, summed, a whole run) put in the tables."""

    images: int = 0
    images_ok: int = 0
    images_error: int = 0
    instances: int = 0
    files: int = 0

    def __add__(self, other: WriteCounts) -> WriteCounts:
        return WriteCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def write_rows(rows: pa.Table, output: str, *, partition_by: Sequence[str]) -> WriteCounts:
    """Write per-image rows with nested detections (``stages.image_rows``) as the two tables.

    The file stem is derived from the image ids the rows hold, so the same images always land
    in the same file names. Instances are written before images: an ``images`` row is visible
    only once its image's instances are.
    """
    if rows.num_rows == 0:
        return WriteCounts()
    images, instances = split_tables(rows)
    ids = images.column("image_id").to_pylist()
    stem = "part-" + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    files = write_table(instances, output, INSTANCES_DIR, partition_by=partition_by, file_stem=stem)
    files += write_table(images, output, IMAGES_DIR, partition_by=partition_by, file_stem=stem)
    ok = int(pc.sum(pc.equal(images.column("status"), STATUS_OK)).as_py() or 0)
    return WriteCounts(
        images=images.num_rows,
        images_ok=ok,
        images_error=images.num_rows - ok,
        instances=instances.num_rows,
        files=len(files),
    )
