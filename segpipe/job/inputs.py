"""Where the images come from: listings of prefixes and globs, or a manifest of URIs.

Listings are streamed into Parquet shards under the output (``_listing/<run_id>/``) so that
the job reads them like a manifest and the driver never holds all URIs at once (memory is
bounded by one directory's listing). Manifests are read by the cluster, not the driver; here
they are only checked (format, URI column, clashing columns) so a bad one fails fast, and
their column types are read once (:func:`manifest_schema`).

A manifest's extra columns reach the ``images`` table with the manifest's own Arrow types.
Between the read and the model they travel packed in one binary column,
:data:`EXTRAS_COLUMN` (:func:`pack_extras`), because Ray Data's numpy batches would re-type
them batch by batch (an int64 column with nulls becomes float64 with NaN, a timestamp loses
its time zone, a column that is null throughout a batch loses its type);
:func:`unpack_extras` restores them with the declared types where the images rows are built.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segpipe.config import PARTITION_COLUMNS
from segpipe.io import fs_root, redact
from segpipe.schema import IMAGES_SCHEMA

LISTING_SHARD_ROWS = 100_000
_GLOB_CHARS = ("*", "?", "[")

# Columns the job adds to the input rows before the model; a manifest may not use the names.
# EXTRAS_COLUMN: a row's extra manifest values, pickled (see pack_extras). COPIES_COLUMN: how
# many input rows named the row's image (1 unless the input repeats it; see
# stages.distinct_images), dropped at the write, where the copies beyond the first are
# counted as duplicates.
EXTRAS_COLUMN = "_segpipe_extras"
COPIES_COLUMN = "_segpipe_copies"
# Pickle protocol of the packed values: fixed, so that equal values pack to equal bytes on
# every worker (the choice among duplicate rows compares them).
_PICKLE_PROTOCOL = 5


class InputError(ValueError):
    """The inputs cannot be used: missing, empty, or a malformed manifest."""


def canonical_uri(uri: str) -> str:
    """The form of an image URI that its ``image_id`` is derived from.

    Plain absolute paths become ``file://`` URIs; URIs with a scheme are kept as given.
    Relative paths are refused: their meaning depends on each worker's directory.
    """
    uri = uri.strip()
    if "://" in uri:
        return uri
    if not os.path.isabs(uri):
        raise ValueError(f"relative path {uri!r}: manifest entries must be absolute or URIs")
    return "file://" + os.path.normpath(uri)


def list_images(inputs: Sequence[str], extensions: Sequence[str]) -> Iterator[str]:
    """Canonical URIs of the image files under each input (a folder/prefix, glob or file).

    A folder or glob yields the files whose names end in one of ``extensions`` (any case); a
    file named directly is taken whatever its name. Order is sorted within each input.
    """
    suffixes = tuple(e.lower() for e in extensions)
    for item in inputs:
        fs, path = fsspec.core.url_to_fs(item)
        if any(c in path for c in _GLOB_CHARS):
            found = fs.glob(path, detail=True)  # one listing, no request per match
            files: Iterable[str] = sorted(
                p
                for p, info in found.items()
                if info["type"] == "file" and p.lower().endswith(suffixes)
            )
        elif fs.isdir(path):
            files = _walk_files(fs, path, suffixes)
        elif fs.isfile(path):
            files = [path]
        else:
            raise InputError(f"input not found: {redact(item)}")
        for p in files:
            yield canonical_uri(fs.unstrip_protocol(p) if "://" in item else os.path.abspath(p))


def _walk_files(
    fs: fsspec.AbstractFileSystem, root: str, suffixes: tuple[str, ...]
) -> Iterator[str]:
    for dirpath, dirnames, filenames in fs.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(suffixes):
                yield f"{dirpath.rstrip('/')}/{name}"


def write_listing(uris: Iterable[str], folder: str, shard_rows: int = LISTING_SHARD_ROWS) -> int:
    """Write ``uris`` as Parquet shards ``folder/part-NNNNN.parquet`` (one ``uri`` column);
    returns how many. Raises InputError when there are none."""
    fs, root = fs_root(folder)
    if fs.exists(root):  # a listing left by an attempt that failed: start afresh
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    total, shard = 0, 0
    buffer: list[str] = []

    def flush() -> None:
        nonlocal shard
        table = pa.table({"uri": pa.array(buffer, type=pa.string())})
        with fs.open(f"{root}/part-{shard:05d}.parquet", "wb") as f:
            pq.write_table(table, f)
        shard += 1
        buffer.clear()

    for uri in uris:
        buffer.append(uri)
        total += 1
        if len(buffer) >= shard_rows:
            flush()
    if buffer:
        flush()
    if total == 0:
        raise InputError("the inputs hold no image files (check the paths and --extensions)")
    return total


def manifest_format(uri: str) -> str:
    """``parquet``, ``csv`` or ``text``, from the manifest's file name."""
    name = uri.split("?", 1)[0].lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    return "text"


def manifest_schema(uri: str) -> pa.Schema | None:
    """The manifest's columns with the types the job reads them with; None for a text
    manifest (one URI a line, no other columns).

    Parquet: the file's own schema. CSV: the types pyarrow infers from the start of the file
    (its first block, 1 MiB), a column empty there taken as a string; the job passes them to
    the CSV reader (:func:`csv_convert_options`) so that every block of the file is read
    with them: a later value that does not parse as its column's type fails the read, naming
    the column, rather than giving blocks of different types. Raises InputError when the
    manifest is missing or unreadable.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise InputError(f"manifest not found: {redact(uri)}")
    kind = manifest_format(uri)
    try:
        if kind == "parquet":
            with fs.open(path, "rb") as f:
                return pq.read_schema(f).remove_metadata()
        if kind == "csv":
            with fs.open(path, "rb", compression="infer") as f:
                inferred = pacsv.open_csv(f).schema
            return pa.schema(
                pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in inferred
            )
    except Exception as exc:
        raise InputError(
            f"cannot read {kind} manifest {redact(uri)}: {type(exc).__name__}: {exc}"
        ) from exc
    return None


def extras_schema(schema: pa.Schema | None, uri_column: str) -> pa.Schema:
    """The extra columns of a manifest of ``schema`` (all but the URI column), in order."""
    if schema is None:
        return pa.schema([])
    return pa.schema([f for f in schema if f.name != uri_column])


def csv_convert_options(schema: pa.Schema, uri_column: str) -> pacsv.ConvertOptions:
    """Convert options that read every block of a CSV manifest with ``schema``'s types (the
    URI column as text, whatever it looks like)."""
    types = {f.name: f.type for f in schema}
    types[uri_column] = pa.string()
    return pacsv.ConvertOptions(column_types=types)


def check_manifest(uri: str, uri_column: str) -> list[str]:
    """Validate a manifest before any cluster work; returns the extra columns it carries."""
    schema = manifest_schema(uri)
    if schema is None:
        return []
    names = schema.names
    if uri_column not in names:
        raise InputError(
            f"manifest {redact(uri)} has no {uri_column!r} column (it has {names}); "
            "name the URI column with --uri-column"
        )
    extras = [n for n in names if n != uri_column]
    reserved = (*IMAGES_SCHEMA.names, *PARTITION_COLUMNS, EXTRAS_COLUMN, COPIES_COLUMN)
    clashes = [n for n in extras if n in reserved]
    if clashes:
        raise InputError(
            f"manifest columns {clashes} clash with output or partition columns of the images "
            "table; rename them"
        )
    return extras


def prepare_manifest_batch(
    batch: pa.Table, uri_column: str, extras: pa.Schema | None = None
) -> pa.Table:
    """Input rows as the job carries them: ``uri`` (the URI column renamed and stripped; rows
    where it is blank, like the empty lines of a text manifest, are dropped) and, when the
    manifest has extra columns (``extras``), :data:`EXTRAS_COLUMN` packing them."""
    column = (
        "text"
        if uri_column not in batch.column_names and "text" in batch.column_names
        else uri_column
    )
    uris = pc.utf8_trim_whitespace(batch.column(column).cast(pa.string()).fill_null(""))
    keep = pc.not_equal(uris, "")
    out = pa.table({"uri": uris})
    if extras is not None and len(extras):
        out = out.append_column(EXTRAS_COLUMN, pack_extras(batch, extras))
    return out.filter(keep)


def pack_extras(batch: pa.Table, extras: pa.Schema) -> pa.Array:
    """Each row's values of the ``extras`` columns as one pickled tuple (binary). Pickled
    Python values come back exactly (:func:`unpack_extras` rebuilds the columns with their
    declared types), and binary values pass through Ray's numpy batches unchanged."""
    missing = [n for n in extras.names if n not in batch.column_names]
    if missing:
        raise InputError(f"manifest rows lack the columns {missing} its schema declares")
    columns = [batch.column(name).to_pylist() for name in extras.names]
    packed = [pickle.dumps(row, protocol=_PICKLE_PROTOCOL) for row in zip(*columns, strict=True)]
    return pa.array(packed, type=pa.binary())


def unpack_extras(packed: Iterable[object], extras: pa.Schema) -> list[pa.Array]:
    """The extra columns, with ``extras``' types, from the values :func:`pack_extras` made
    (bytes, one a row; carried by our own pipeline, never read from a user's file)."""
    rows = [pickle.loads(bytes(p)) for p in packed]  # type: ignore[call-overload]
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in extras]
    return [_typed_array(list(values), f.type) for values, f in zip(columns, extras, strict=True)]


def _typed_array(values: list[object], type_: pa.DataType) -> pa.Array:
    if pa.types.is_dictionary(type_):  # pyarrow builds those from their plain values
        return pa.array(values, type=type_.value_type).dictionary_encode().cast(type_)
    return pa.array(values, type=type_)
