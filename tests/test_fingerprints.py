"""The weights' fingerprint cache: a driver that checked the same weights before skips torch;
anything that changes what the check would say is checked again; failures are not kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segpipe.config import ModelConfig
from segpipe.core.fingerprints import CACHE_ENV, checked_fingerprint
from segpipe.core.weights import WeightsError, fingerprint_weights, shipped_weights


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.json"))


def test_a_checked_fingerprint_is_read_back_without_importing_torch(cache: Path) -> None:
    cfg = ModelConfig(weights="shapes")
    found = checked_fingerprint(cfg)
    assert found == fingerprint_weights(cfg) and len(entries(cache)) == 1
    probe = (
        "import json, sys\n"
        "from segpipe.config import ModelConfig\n"
        "from segpipe.core.fingerprints import checked_fingerprint\n"
        "found = checked_fingerprint(ModelConfig(weights='shapes'))\n"
        "print(json.dumps({'found': found, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == {"found": found, "torch": False}
    # Settings that do not name or shape the weights share the entry.
    assert checked_fingerprint(ModelConfig(weights="shapes", score_threshold=0.5)) == found
    assert len(entries(cache)) == 1


def test_what_changes_the_check_is_checked_again(
    cache: Path, tmp_path: Path, random_checkpoint: Path
) -> None:
    path = tmp_path / "model.pt"
    shutil.copy(str(shipped_weights("shapes")), path)
    cfg = ModelConfig(weights=str(path))
    first = checked_fingerprint(cfg)
    # Other bytes under the same name: a new check, which sees the new file.
    shutil.copy(random_checkpoint, path)
    second = checked_fingerprint(cfg)
    assert second["sha256"] != first["sha256"]
    assert second == fingerprint_weights(cfg) and second["arch"] == "maskrcnn_resnet50_fpn"
    # Other input sizes: a new check too.
    assert checked_fingerprint(ModelConfig(weights=str(path), min_size=320))["min_size"] == 320
    assert len(entries(cache)) == 3


def test_a_failed_check_is_not_kept(cache: Path) -> None:
    cfg = ModelConfig(weights="shapes", weights_sha256="0" * 64)
    for _ in range(2):
        with pytest.raises(WeightsError, match="was required"):
            checked_fingerprint(cfg)
    with pytest.raises(WeightsError, match="not found"):
        checked_fingerprint(ModelConfig(weights="/nowhere/model.pt"))
    assert entries(cache) == []


def test_an_unreadable_entry_is_checked_again(cache: Path) -> None:
    cfg = ModelConfig(weights="shapes")
    found = checked_fingerprint(cfg)
    (entry,) = entries(cache)
    entry.write_text("{not json")
    assert checked_fingerprint(cfg) == found
    assert json.loads(entry.read_text()) == found
