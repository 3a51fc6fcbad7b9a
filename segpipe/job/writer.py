"""Parquet output: the ``images`` and ``instances`` tables under one output URI.

Layout (Hive-style partitions, one folder level per partition column)::

    <output>/images/run_id=<run>/<file_stem>-0.parquet
    <output>/instances/run_id=<run>/<file_stem>-0.parquet

A partition column applies to each table that has it (``label`` partitions only
``instances``). File names are deterministic (``file_stem`` comes from the caller), so writing
the same unit of work twice replaces its files instead of adding copies. :func:`write_rows`
writes through the commit protocol (:mod:`segpipe.job.commit`): readers never see a partial file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from pyarrow.fs import FSSpecHandler, PyFileSystem

from segpipe import layout
from segpipe.io import fs_root, is_local, retrying
from segpipe.job.commit import Unit, WriteCounts, commit_unit, committed_unit, publish_committed
from segpipe.job.stages import split_tables
from segpipe.layout import IMAGES_DIR, INSTANCES_DIR
from segpipe.schema import STATUS_OK


def write_table(
    table: pa.Table,
    output: str,
    name: str,
    *,
    partition_by: Sequence[str],
    file_stem: str,
) -> list[str]:
    """Write ``table`` under ``<output>/<name>/``; returns the paths written."""
    fs, root = fs_root(output)
    columns = [c for c in partition_by if c in table.column_names]
    written: list[str] = []
    pds.write_dataset(
        table,
        base_dir=layout.table(root, name),
        format="parquet",
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        partitioning=columns or None,
        partitioning_flavor="hive" if columns else None,
        basename_template=f"{file_stem}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        file_visitor=lambda f: written.append(f.path),
        # Object stores have no folders; asking for them costs requests (and can make
        # s3fs try to create the bucket).
        create_dir=is_local(fs),
    )
    return written


def write_rows(rows: pa.Table, output: str, *, partition_by: Sequence[str]) -> WriteCounts:
    """Write per-image rows with nested detections (``stages.image_rows``) as the two tables,
    through the commit protocol of :mod:`segpipe.job.commit` (stage, commit, publish).

    The unit's name is a hash of the run id and the image ids it holds, so a retried write
    of the same images finds the unit's commit marker and keeps that first commit.
    """
    if rows.num_rows == 0:
        return WriteCounts()
    images, instances = split_tables(rows)
    run_ids = pc.unique(images.column("run_id")).to_pylist()
    if len(run_ids) != 1:
        raise ValueError(f"a unit of rows must belong to one run, got {run_ids}")
    run_id = str(run_ids[0])
    ids = images.column("image_id").to_pylist()
    key = "\n".join([run_id, *sorted(ids)])
    stem = "part-" + hashlib.sha256(key.encode()).hexdigest()[:20]
    done = committed_unit(output, run_id, stem)
    if done is not None:
        # A retry of a task whose unit was committed: the first commit wins (a retry may
        # have decoded or detected differently, and its files could differ in name).
        publish_committed(output, done)
        return done.counts
    staged = layout.staged_unit(output, run_id, stem)
    unit = Unit(run_id, stem)
    _, staged_root = fs_root(staged)
    for name, table in ((IMAGES_DIR, images), (INSTANCES_DIR, instances)):
        paths = retrying(
            write_table, table, staged, name, partition_by=partition_by, file_stem=stem
        )
        unit.files[name] = sorted(p[len(staged_root) + 1 :] for p in paths)
    ok = int(pc.sum(pc.equal(images.column("status"), STATUS_OK)).as_py() or 0)
    unit.counts = WriteCounts(
        images=images.num_rows,
        images_ok=ok,
        images_error=images.num_rows - ok,
        instances=instances.num_rows,
        files=sum(len(f) for f in unit.files.values()),
    )
    commit_unit(output, unit)
    return unit.counts
