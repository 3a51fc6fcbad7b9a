"""The run record: ``<output>/_runs/<run_id>.json``, written at the start and end of a run.

It holds the configuration (URIs redacted, no credentials: those never enter the config),
library versions, the model and a fingerprint of its weights, counts and timings.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from segpipe import layout
from segpipe.config import RunConfig
from segpipe.io import atomic_write, fs_root, redact
from segpipe.records import read_record

__all__ = ["now", "public_config", "read_record", "versions", "write_json", "write_record"]

_PACKAGES = ("segpipe", "torch", "torchvision", "ray", "pyarrow", "pycocotools", "pillow")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def public_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as JSON-ready data with every URI redacted."""
    data = dataclasses.asdict(cfg)
    data["output"] = redact(cfg.output)
    data["inputs"] = [redact(u) for u in cfg.inputs]
    data["manifest"] = redact(cfg.manifest) if cfg.manifest else None
    data["model"]["weights"] = redact(cfg.model.weights)
    if cfg.model.categories:
        data["model"]["categories"] = redact(cfg.model.categories)
    return data


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_record(output: str, run_id: str, record: dict[str, Any]) -> None:
    write_json(layout.record(output, run_id), record)


def write_json(uri: str, data: dict[str, Any]) -> None:
    """Write ``data`` so that a reader sees the old file or the new one, never half of one."""
    fs, path = fs_root(uri)
    atomic_write(fs, path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
