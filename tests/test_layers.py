"""The library's layering is a check that can fail: lint-imports with the contracts in
pyproject.toml's [tool.importlinter] (`make lint` runs it too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contract_names() -> dict[str, str]:
    contracts = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]["contracts"]
    return {contract["id"]: contract["name"] for contract in contracts}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the package `segpipe` found first from `cwd` (lint-imports puts its working
    directory at the front of sys.path), with this checkout's contracts."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: the dev extra installs import-linter (make sync)")
    # A wide terminal so that rich does not wrap a contract's name over two lines.
    env = {**os.environ, "COLUMNS": "1000", "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(CONFIG)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_layering_contracts_are_kept() -> None:
    result = _lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in _contract_names().values():
        assert f"{name} KEPT" in output, output


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        ("core/decode.py", "import segpipe.job.stages", {"layers", "core"}),
        ("analytics/query.py", "import ray", {"ray", "no-ray"}),
    ],
)
def test_a_bad_import_breaks_its_contract(
    tmp_path: Path, module: str, bad_import: str, broken: set[str]
) -> None:
    shutil.copytree(
        ROOT / "segpipe", tmp_path / "segpipe", ignore=shutil.ignore_patterns("__pycache__", "*.pt")
    )
    path = tmp_path / "segpipe" / module
    source = path.read_text()
    path.write_text(f"{source}\n{bad_import}  # deliberately breaks the layering\n")
    line = source.count("\n") + 2
    importer = "segpipe." + module.removesuffix(".py").replace("/", ".")
    imported = bad_import.removeprefix("import ")

    result = _lint_imports(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    names = _contract_names()
    for contract_id, name in names.items():
        state = "BROKEN" if contract_id in broken else "KEPT"
        assert f"{name} {state}" in output, output
    # The copy, not the installed checkout, was analysed: the report names the inserted line.
    assert f"{importer} -> {imported} (l.{line})" in output, output
