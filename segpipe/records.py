"""Reading run records (``<output>/_runs/<run_id>.json``): the job writes them
(:mod:`segpipe.job.record`), the job and the readers of an output read them."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from segpipe import layout
from segpipe.io import fs_root
from segpipe.schema import check_schema_version


def read_record(output: str, run_id: str) -> dict[str, Any]:
    with fsspec.open(layout.record(output, run_id), "r") as f:
        data: dict[str, Any] = json.load(f)
    return data


def run_records(output: str) -> list[dict[str, Any]]:
    """The records of the output's runs (one small JSON object per run, by run id)."""
    fs, root = fs_root(output)
    folder = f"{root}/{layout.RUNS_DIR}"
    fs.invalidate_cache(folder)  # a listing cached earlier in this process may be stale
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        names = []
    found: list[dict[str, Any]] = []
    for name in sorted(n for n in names if n.endswith(".json")):
        try:
            record = read_record(output, name[: -len(".json")])
        except (FileNotFoundError, ValueError):
            continue
        # A run's record names its run; the lease and metrics files beside it do not.
        if record.get("run_id") == name[: -len(".json")]:
            found.append(record)
    return found


def check_schema_versions(output: str, records: list[dict[str, Any]] | None = None) -> None:
    """Refuse an output that holds a run whose tables have a schema major version this
    segpipe does not know (:func:`segpipe.schema.check_schema_version`)."""
    for record in run_records(output) if records is None else records:
        check_schema_version(record.get("schema_version"), f"run {record.get('run_id')}")
