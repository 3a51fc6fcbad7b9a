"""The command line around a written output, and the README's main command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from segpipe.cli import build_parser, main, run_config
from segpipe.config import BenchConfig, DecodeConfig, ModelConfig, RunConfig, TileConfig
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


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """The top-level parser ("") and each subcommand's, by name."""
    top = build_parser()
    (sub,) = (a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"": top, **sub.choices}


def test_every_flag_has_help() -> None:
    for name, parser in _parsers().items():
        for action in parser._actions:
            assert action.help and action.help.strip(), (name, action.option_strings, action.dest)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help and choice.help.strip(), choice.dest


def test_every_setting_is_a_flag_of_run() -> None:
    """Each field of the run's configs has a flag of `segpipe run` (min_actors and max_actors:
    --actors), and the flags land in the right fields."""
    run = _parsers()["run"]
    dests = {a.dest for a in run._actions}
    options = {o for a in run._actions for o in a.option_strings}
    for cls in (RunConfig, ModelConfig, DecodeConfig, TileConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("model", "decode", "tiles"):
                continue
            if "flag" in f.metadata:
                assert (f.metadata["flag"].dest or f.name) in dests, f.name
            else:
                assert f.metadata["set_by"] in options, f.name
    assert {f.name for f in dataclasses.fields(RunConfig) if "set_by" in f.metadata} == {
        "max_actors"
    }
    parse = build_parser().parse_args
    # No flag: the dataclasses' defaults (the flags default to None, not to a value of their own).
    assert run_config(parse(["run", "--input", "/in", "--output", "/out"])) == RunConfig(
        output="/out", inputs=("/in",)
    )
    argv = "run --input /a /b --input /c --output /out --extensions png,jpg --uri-column u"
    argv += " --score-threshold 0.25 --max-pixels 1000 --cudnn-benchmark --actors 2:5"
    argv += " --gpus-per-actor 0.5 --partition-by none --images-per-file 7"
    argv += " --tile 512 --tile-overlap 64 --tile-above 1000000 --tile-match-iou 0.3"
    cfg = run_config(parse(argv.split()))
    assert cfg.inputs == ("/a", "/b", "/c") and cfg.extensions == ("png", "jpg")
    assert cfg.uri_column == "u" and cfg.images_per_file == 7 and cfg.partition_by == ()
    assert (cfg.min_actors, cfg.max_actors, cfg.gpus_per_actor) == (2, 5, 0.5)
    assert cfg.model == ModelConfig(score_threshold=0.25, cudnn_benchmark=True)
    assert cfg.decode == DecodeConfig(max_pixels=1000)
    assert cfg.tiles == TileConfig(
        tile=512, tile_overlap=64, tile_above=1_000_000, tile_match_iou=0.3
    )
    helps = {a.dest: a.help for a in run._actions}
    assert helps["batch_size"] == "images per model call (default: 4)"
    assert helps["partition_by"].endswith("(default: run_id)")


def test_bench_help_lists_help_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line a flag
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--width WIDTH width of the generated JPEGs (default: 640)" in out
    for f in dataclasses.fields(BenchConfig):
        flag, text = f"--{f.name.replace('_', '-')}", f.metadata["flag"].help
        assert re.search(rf"{flag}( [A-Z_]+)? {re.escape(text)}", out), (flag, out)


def test_run_summary_names_dropped_duplicates() -> None:
    from segpipe.job.runs import RunSummary

    summary = RunSummary("r", "/out", 24, 23, 1, 40, 2, duplicates=0, seconds=2.0)
    assert "duplicate" not in summary.describe()
    line = dataclasses.replace(summary, duplicates=3).describe()
    assert "24 images (23 ok, 1 error), 3 duplicate input rows dropped, 40 instances" in line
