"""The pages segpipe writes (render's gallery, report, compare) opened in a real browser."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def loaded_dom(page: Path, profile: Path) -> tuple[str, str]:
    """The DOM of ``page`` after headless Chromium loaded it (and its scripts ran), and
    Chromium's stderr. Without Chromium the test is skipped, or fails in CI."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("SEGPIPE_CI"):
            pytest.fail("chromium is required in CI (SEGPIPE_CI is set)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout, result.stderr[-2000:]
