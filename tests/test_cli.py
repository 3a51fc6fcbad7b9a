"""The command line around a written output, and the README's main command."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from segpipe.cli import main
from segpipe.job.stages import image_rows
from segpipe.job.writer import write_rows
from tests.conftest import run_isolated
from tests.masks import detections_from_full_masks


@pytest.fixture
def output(tmp_path: Path) -> str:
    """A small output written by the writer directly: two images, three instances."""
    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 2:8, 3:9] = masks[1, 10:15, 10:20] = masks[2, 0:2, 0:2] = True
    det = detections_from_full_masks(
        boxes=np.array([[3, 2, 9, 8], [10, 10, 20, 15], [0, 0, 2, 2]], dtype=np.float32),
        labels=np.array([1, 1, 3]),
        scores=np.array([0.9, 0.6, 0.3], dtype=np.float32),
        masks=masks,
    )
    batch = {
        "uri": np.array(["file:///a.png", "file:///b.png"], dtype=object),
        "image_id": np.array(["ida", "idb"], dtype=object),
        "width": np.array([30, -1], dtype=np.int32),
        "height": np.array([20, -1], dtype=np.int32),
        "error_code": np.array(["", "empty"], dtype=object),
        "error": np.array(["", "empty file (0 bytes)"], dtype=object),
    }
    rows = image_rows(batch, "r1", {0: det}, ["__background__", "person", "bicycle", "car"])
    out = str(tmp_path / "out")
    write_rows(rows, out, partition_by=["run_id"])
    return out


def test_query_formats(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT label, count(*) AS n FROM instances GROUP BY label ORDER BY n DESC"
    assert main(["query", "--output", output, "--format", "json", sql]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"label": "person", "n": 2},
        {"label": "car", "n": 1},
    ]
    assert main(["query", "--output", output, "--format", "csv", sql]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ['"label","n"', '"person",2']
    assert main(["query", "--output", output, "SELECT status, error FROM images"]) == 0
    assert "empty file (0 bytes)" in capsys.readouterr().out


def test_query_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", "--output", str(tmp_path), "SELECT 1"]) == 2
    assert capsys.readouterr().err.strip() == f"segpipe: error: no images table under {tmp_path}"


def test_demo_runs_end_to_end() -> None:
    """`make demo`'s command, in its own process: its own S3 server and embedded Ray."""
    result = run_isolated([str(Path(sys.executable).with_name("segpipe")), "demo", "--images", "3"])
    out = result.stdout
    assert "run demo: 4 images (3 ok, 1 error)" in out
    assert "not_an_image" in out and "objects per class" in out
    # The quality report: the standard COCO numbers for boxes and masks, from pycocotools.
    assert re.search(r"^bbox(\s+-?[01]\.\d{3}){6}$", out, re.M), out[-1500:]
    assert re.search(r"^segm(\s+-?[01]\.\d{3}){6}$", out, re.M), out[-1500:]
    ap50 = float(re.search(r"mask AP@0\.5 = ([01]\.\d{3})", out).group(1))  # type: ignore[union-attr]
    assert ap50 >= 0.5
