"""Where the images come from: listings of prefixes and globs, or a manifest of URIs.

Listings are streamed into Parquet shards under the output (``_listing/<run_id>/``) so that
the job reads them like a manifest and the driver never holds all URIs at once (memory is
bounded by one directory's listing). Manifests are read by the cluster, not the driver; here
they are only checked (format, URI column, clashing columns) so a bad one fails fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from segpipe.config import PARTITION_COLUMNS
from segpipe.io import fs_root, redact
from segpipe.schema import IMAGES_SCHEMA

LISTING_SHARD_ROWS = 100_000
_GLOB_CHARS = ("*", "?", "[")


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


def check_manifest(uri: str, uri_column: str) -> list[str]:
    """Validate a manifest before any cluster work; returns the extra columns it carries."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise InputError(f"manifest not found: {redact(uri)}")
    kind = manifest_format(uri)
    try:
        if kind == "parquet":
            with fs.open(path, "rb") as f:
                names = pq.read_schema(f).names
        elif kind == "csv":
            with fs.open(path, "rb", compression="infer") as f:
                reader = pacsv.open_csv(f)
                names = reader.schema.names
        else:
            return []
    except Exception as exc:
        raise InputError(
            f"cannot read {kind} manifest {redact(uri)}: {type(exc).__name__}: {exc}"
        ) from exc
    if uri_column not in names:
        raise InputError(
            f"manifest {redact(uri)} has no {uri_column!r} column (it has {names}); "
            "name the URI column with --uri-column"
        )
    extras = [n for n in names if n != uri_column]
    clashes = [n for n in extras if n in IMAGES_SCHEMA.names or n in PARTITION_COLUMNS]
    if clashes:
        raise InputError(
            f"manifest columns {clashes} clash with output or partition columns of the images "
            "table; rename them"
        )
    return extras


def prepare_manifest_batch(batch: dict[str, np.ndarray], uri_column: str) -> dict[str, np.ndarray]:
    """Rename the URI column to ``uri``, strip it, and drop blank entries (empty lines)."""
    column = "text" if uri_column not in batch and "text" in batch else uri_column
    uris = np.array(["" if u is None else str(u).strip() for u in batch[column]], dtype=object)
    keep = uris != ""
    out = {k: v[keep] for k, v in batch.items() if k != column}
    out["uri"] = uris[keep]
    return out
