"""Parquet output: the ``images`` and ``instances`` tables under one output URI.

Layout (Hive-style partitions, one folder level per partition column)::

    <output>/images/run_id=<run>/<file_stem>-<k>-0.parquet
    <output>/instances/run_id=<run>/<file_stem>-<k>-0.parquet

A partition column applies to each table that has it (``label`` partitions only
``instances``). File names are deterministic (``file_stem`` comes from the caller, ``k``
numbers the files of a unit), so writing the same unit of work twice replaces its files
instead of adding copies. :func:`write_rows` writes through the commit protocol
(:mod:`segpipe.job.commit`): readers never see a partial file.

Within a file, rows are sorted by ``image_id`` (instances by ``image_id, instance_id``) and
split into row groups of :data:`ROWS_PER_GROUP` rows, with min/max statistics: a query
``WHERE image_id = ...`` reads the footer of each file and, of its row groups, only the one
whose ``[min, max]`` covers the id (two when the image's rows straddle a group boundary);
DuckDB and Spark skip the others. Files themselves are not skipped: a unit's images are
spread over the whole id space (ids are hashes), so every file's range covers any id.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
from pyarrow.fs import FSSpecHandler, PyFileSystem

from segpipe import layout
from segpipe.config import MAX_FILE_BYTES
from segpipe.io import fs_root, is_local, redact, retrying
from segpipe.job.commit import Unit, WriteCounts, commit_unit, committed_unit, publish_committed
from segpipe.job.stages import split_tables, take_copies
from segpipe.layout import IMAGES_DIR, INSTANCES_DIR
from segpipe.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY, STATUS_OK

# Rows per Parquet row group. A lookup by image_id reads one row group of each file (the
# columns it selects), a scan reads them all; an images row is ~0.3 KB, an instances row a
# few hundred bytes to a few KB (its RLE). A unit of 5000 images is then 3 images row groups
# and, at 10-100 detections an image, 3-30 instances row groups.
ROWS_PER_GROUP = {IMAGES_DIR: 2048, INSTANCES_DIR: 16384}
# Statistics on every column but the RLE strings, which no query filters on (a long string's
# min and max would only fill the footer).
_NO_STATISTICS = {"mask_rle"}
# The order of each table's rows in its files.
SORT_KEYS = {IMAGES_DIR: ("image_id",), INSTANCES_DIR: ("image_id", "instance_id")}


def write_table(
    table: pa.Table,
    output: str,
    name: str,
    *,
    partition_by: Sequence[str],
    file_stem: str,
) -> list[str]:
    """Write ``table`` under ``<output>/<name>/``, rows in the table's order, in row groups of
    :data:`ROWS_PER_GROUP` rows; returns the paths written."""
    fs, root = fs_root(output)
    columns = [c for c in partition_by if c in table.column_names]
    group = ROWS_PER_GROUP.get(name, ROWS_PER_GROUP[IMAGES_DIR])
    parquet = pds.ParquetFileFormat()
    options = parquet.make_write_options(
        write_statistics=[c for c in table.column_names if c not in _NO_STATISTICS]
    )
    written: list[str] = []
    metadata = {
        **(table.schema.metadata or {}),
        SCHEMA_VERSION_KEY.encode(): SCHEMA_VERSION.encode(),
    }
    pds.write_dataset(
        table.replace_schema_metadata(metadata),
        base_dir=layout.table(root, name),
        format=parquet,
        file_options=options,
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        partitioning=columns or None,
        partitioning_flavor="hive" if columns else None,
        basename_template=f"{file_stem}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        file_visitor=lambda f: written.append(f.path),
        # Full row groups, in the table's order (sorted by the caller): each group's
        # image_id statistics then cover a narrow range.
        min_rows_per_group=group,
        max_rows_per_group=group,
        preserve_order=True,
        # Object stores have no folders; asking for them costs requests (and can make
        # s3fs try to create the bucket).
        create_dir=is_local(fs),
    )
    return written


def write_rows(
    rows: pa.Table,
    output: str,
    *,
    partition_by: Sequence[str],
    max_file_bytes: int = MAX_FILE_BYTES,
    attempt: str | None = None,
) -> WriteCounts:
    """Write per-image rows with nested detections (``stages.image_rows``) as the two tables,
    through the commit protocol of :mod:`segpipe.job.commit` (stage, commit, publish).

    The unit's name is a hash of the run id, the attempt and the image ids it holds, so a
    retried write of the same images finds the unit's commit marker and keeps that first
    commit, and units of two attempts never share a name. ``attempt``: the attempt that
    writes (it must hold the run's lease when it commits; None: no lease, as in unit
    tests). Each table's rows are sorted by image id and written as files of at most
    ``max_file_bytes`` of rows (Arrow size; see :func:`file_pieces`), all named in the one
    commit marker.
    """
    if rows.num_rows == 0:
        return WriteCounts()
    rows, duplicates = take_copies(rows)
    images, instances = split_tables(rows)
    run_ids = pc.unique(images.column("run_id")).to_pylist()
    if len(run_ids) != 1:
        raise ValueError(f"a unit of rows must belong to one run, got {run_ids}")
    run_id = str(run_ids[0])
    ids = images.column("image_id").to_pylist()
    key = "\n".join([run_id, *([attempt] if attempt else []), *sorted(ids)])
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
        paths: list[str] = []
        for k, piece in enumerate(file_pieces(table, SORT_KEYS[name], max_file_bytes)):
            paths += retrying(
                write_table, piece, staged, name, partition_by=partition_by, file_stem=f"{stem}-{k}"
            )
        unit.files[name] = sorted(p[len(staged_root) + 1 :] for p in paths)
    unit.counts = unit_counts(images, instances, unit.files, duplicates)
    return commit_unit(output, unit, attempt).counts


def unit_counts(
    images: pa.Table, instances: pa.Table, files: dict[str, list[str]], duplicates: int
) -> WriteCounts:
    """What a unit of ``images`` and ``instances`` rows, written as ``files``, counts."""
    ok = int(pc.sum(pc.equal(images.column("status"), STATUS_OK)).as_py() or 0)
    errors, examples = error_counts(images)
    return WriteCounts(
        images=images.num_rows,
        images_ok=ok,
        images_error=images.num_rows - ok,
        instances=instances.num_rows,
        files=sum(len(f) for f in files.values()),
        duplicates=duplicates,
        tiled_images=int(pc.sum(pc.greater(images.column("tiles"), 0)).as_py() or 0),
        tiles=int(pc.sum(images.column("tiles")).as_py() or 0),
        errors=errors,
        error_examples=examples,
    )


def error_counts(images: pa.Table) -> tuple[dict[str, int], dict[str, str]]:
    """The error rows of an ``images`` table by error code, and each code's smallest URI
    (redacted)."""
    failed = images.filter(pc.not_equal(images.column("status"), STATUS_OK))
    if failed.num_rows == 0:
        return {}, {}
    table = pa.table({"code": failed.column("error_code").fill_null(""), "uri": failed["uri"]})
    grouped = table.group_by("code").aggregate([("uri", "count"), ("uri", "min")])
    codes = grouped["code"].to_pylist()
    counts = dict(zip(codes, grouped["uri_count"].to_pylist(), strict=True))
    # Markers and the run record name them: without any credentials a URI may carry.
    uris = [redact(uri) for uri in grouped["uri_min"].to_pylist()]
    return counts, dict(zip(codes, uris, strict=True))


def file_pieces(table: pa.Table, sort_keys: Sequence[str], max_bytes: int) -> Iterator[pa.Table]:
    """``table``'s rows sorted by ``sort_keys`` (``image_id`` first), in consecutive pieces of
    at most ``max_bytes`` of rows each (:func:`row_bytes`), cut between images: an image's
    rows stay in one piece, which holds that image alone when its rows take more than
    ``max_bytes``. An empty table is one empty piece. Each piece is made when it is reached,
    so a large unit is never held twice."""
    n = table.num_rows
    order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in sort_keys])
    if n == 0 or table.nbytes <= max_bytes:
        yield table.take(order)
        return
    before = np.concatenate(([0], np.cumsum(row_bytes(table)[order.to_numpy()])))
    ids = table.column("image_id").take(order).combine_chunks()
    changes = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    bounds = [0, *(np.flatnonzero(changes) + 1).tolist(), n]  # where each image's rows start
    start = 0  # of the piece being filled; before[i] is the bytes of the sorted rows [0, i)
    for previous, end in itertools.pairwise(bounds):
        if before[end] - before[start] > max_bytes and previous > start:
            yield table.take(order.slice(start, previous - start))
            start = previous
    yield table.take(order.slice(start, n - start))


def row_bytes(table: pa.Table) -> np.ndarray:
    """Each row's Arrow size in bytes (int64): fixed-width values, string and binary values
    with their offsets; a column of another type (a nested manifest column) counts its
    average per row."""
    n = table.num_rows
    sizes = np.zeros(n, dtype=np.int64)
    for column in table.columns:
        kind = column.type
        if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind):
            lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy()
            sizes += lengths.astype(np.int64) + 8
        elif pa.types.is_string(kind) or pa.types.is_binary(kind):
            lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy()
            sizes += lengths.astype(np.int64) + 4
        elif pa.types.is_primitive(kind):
            sizes += max(1, kind.bit_width // 8)
        else:
            sizes += column.nbytes // max(1, n)
    return sizes
