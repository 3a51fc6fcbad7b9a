"""The weights' fingerprint, remembered on this machine so that a driver can skip torch.

Checking the weights on the driver (:func:`segpipe.core.weights.fingerprint_weights`) means
importing torch and torchvision: about 7 s of one core, spent while Ray starts on the same
cores. Its result depends only on the model settings that name and shape the weights, on
the bytes of the checkpoint and of the category file, and on the code that checks them. So
:func:`checked_fingerprint` keeps each result that passed in a small JSON file named by a
hash of all of those, and a driver that has checked the same weights before reads that file
instead (it still reads the checkpoint, to hash it). A failed check is never kept: it fails
again, with its message, every time.

The folder is ``$SEGPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/segpipe``, else
``~/.cache/segpipe``. A missing, unreadable or unwritable cache only means checking again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import fsspec

from segpipe.config import SHIPPED_WEIGHTS, ModelConfig
from segpipe.io import atomic_write, read_bytes, sha256_hex

log = logging.getLogger(__name__)

CACHE_ENV = "SEGPIPE_CACHE_DIR"
# The ModelConfig fields the check reads; the others (thresholds, device, precision) do not
# change what the weights are.
_KEY_FIELDS = ("arch", "weights", "weights_sha256", "categories", "min_size", "max_size")
# The code that resolves and checks weights: a change to it is a new key.
_CHECKING_CODE = ("core/weights.py", "core/tiny.py")


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segpipe"


def checked_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """:func:`~segpipe.core.weights.fingerprint_weights` of ``cfg``, from this machine's
    cache when the same weights passed the same check before."""
    path = cache_dir() / "fingerprints" / f"{_key(cfg)}.json"
    try:
        found = json.loads(path.read_text())
        if isinstance(found, dict):
            return found
    except (OSError, ValueError):
        pass
    from segpipe.core.weights import fingerprint_weights  # torch and torchvision

    found = fingerprint_weights(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(fsspec.filesystem("file"), str(path), json.dumps(found))
    except OSError as exc:
        log.debug("could not keep the weights' fingerprint in %s: %s", path, exc)
    return found


def _key(cfg: ModelConfig) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k in _KEY_FIELDS}
    package = resources.files("segpipe")
    parts = {
        "settings": settings,
        "versions": {d: _version(d) for d in ("torch", "torchvision")},
        "code": [sha256_hex(package.joinpath(p).read_bytes()) for p in _CHECKING_CODE],
        "checkpoint": _content(_checkpoint_source(cfg.weights)),
        "categories": _content(cfg.categories),
    }
    return sha256_hex(json.dumps(parts, sort_keys=True).encode())


def _checkpoint_source(weights: str) -> str | None:
    shipped = SHIPPED_WEIGHTS.get(weights)
    if shipped is not None:
        return str(resources.files("segpipe").joinpath(shipped))
    return None if weights.lower() == "none" else weights


def _content(uri: str | None) -> str | None:
    """The SHA-256 of the file at ``uri``; None where there is none (a torchvision weights
    name, say), or it cannot be read (then the check says why)."""
    if uri is None:
        return None
    try:
        return sha256_hex(read_bytes(uri))
    except Exception:  # FileNotFoundError, a bad URI, no credentials: not a file to hash
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
