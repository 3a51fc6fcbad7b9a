"""`segpipe report`: a run's plots and record on one page, drawn from SQL aggregates, which a
real browser opens offline with every plot decoded."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from PIL import Image

from segpipe.analytics import report as report_module
from segpipe.analytics.query import connect
from segpipe.analytics.report import Report, gather, report_html, write_report
from segpipe.cli import main
from segpipe.job.record import write_record
from tests.browser import loaded_dom
from tests.masks import detections_from_full_masks
from tests.outputs import coco_like_output, write_output

RUN = "r50-fpn"  # has a run record; the fixture's other run, r50-fpn-v2, has none
FIGURES = ("classes.png", "scores.png", "mask_areas.png", "instances_per_image.png")

# A record as the job writes it (segpipe/job/runs.py), abridged.
RECORD: dict[str, Any] = {
    "run_id": RUN,
    "status": "succeeded",
    "started_at": "2026-10-01T08:00:00+00:00",
    "finished_at": "2026-10-01T08:01:40+00:00",
    "attempts": 1,
    "schema_version": "1.0",
    "config": {
        "output": "s3://bucket/out",
        "inputs": ["s3://photos/2026/"],
        "model": {"arch": "auto", "weights": "DEFAULT", "score_threshold": 0.05},
    },
    "weights": {
        "kind": "torchvision",
        "name": "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
        "sha256": None,
        "arch": "maskrcnn_resnet50_fpn",
        "min_size": 800,
        "max_size": 1333,
    },
    "versions": {"python": "3.11.9", "segpipe": "0.1.0"},
    "counts": {"images": 30, "images_ok": 27, "images_error": 3, "instances": 99},
    "seconds": 100.25,
    "images_per_s": 0.299,
    "startup_s": 41.5,
    "steady_images_per_s": 0.51,
    "timeline": {"prepare": 1.2, "checked": 3.4, "model_loaded": 30.1, "first_batch_out": 41.5},
    "timeline_actors": 2,
}


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("report") / "out")
    coco_like_output(out)
    write_record(out, RUN, RECORD)
    return out


@pytest.fixture(scope="module")
def duck(output: str) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(output)
    yield con
    con.close()


@pytest.fixture(scope="module")
def written(
    duck: duckdb.DuckDBPyConnection, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Report, Path]:
    folder = tmp_path_factory.mktemp("report") / "html"
    return write_report(duck, RUN, str(folder), record=RECORD), folder


def test_the_page_shows_the_runs_counts(
    duck: duckdb.DuckDBPyConnection, written: tuple[Report, Path]
) -> None:
    report, folder = written
    assert report.figures == FIGURES and report.page == f"{folder}/index.html"
    page = (folder / "index.html").read_text()
    assert "<title>segpipe report: run r50-fpn</title>" in page
    classes = duck.execute(
        "SELECT label, count(*) FROM instances WHERE run_id = ? GROUP BY 1", [RUN]
    ).fetchall()
    assert len(classes) == report.classes == 4
    for label, n in classes:
        assert f'<tr><td>{label}</td><td class="n">{n:,}</td>' in page
    assert report.instances == sum(n for _, n in classes)
    assert f'<body data-images-total="{len(FIGURES)}">' in page
    assert all(re.search(rf'<img src="{f}" alt="[^"]{{20,}}"', page) for f in FIGURES)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network


def test_the_error_table_names_each_code_with_its_uris(
    duck: duckdb.DuckDBPyConnection, written: tuple[Report, Path]
) -> None:
    report, folder = written
    page = (folder / "index.html").read_text()
    errors = duck.execute(
        "SELECT error_code, uri FROM images WHERE run_id = ? AND status = 'error'", [RUN]
    ).fetchall()
    assert report.errors == len(errors) == 3
    rows = re.findall(r'<tr><td>(\w+)</td><td class="n">(\d+)</td><td>(.*?)</td>', page)
    found = {code: (int(n), re.findall(r'class="uri">([^<]+)<', cell)) for code, n, cell in rows}
    assert found == {code: (1, [uri]) for code, uri in errors}


def test_the_plots_are_real_pngs(written: tuple[Report, Path]) -> None:
    _, folder = written
    for name in FIGURES:
        path = folder / name
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 200
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, name  # more than a blank


def test_the_aggregates_match_the_rows(duck: duckdb.DuckDBPyConnection) -> None:
    stats = gather(duck, RUN)
    # Instances per image, images without any included, against a join of the two tables.
    joined = duck.execute(
        "SELECT n, count(*) FROM (SELECT i.image_id, count(s.image_id) AS n FROM images i "
        "LEFT JOIN instances s ON s.run_id = i.run_id AND s.image_id = i.image_id "
        "WHERE i.run_id = ? AND i.status = 'ok' GROUP BY i.image_id) GROUP BY n ORDER BY n",
        [RUN],
    ).fetchall()
    assert stats.per_image == joined and joined[0][0] == 0
    assert sum(stats.scores[None]) == stats.instances == sum(n for _, n in stats.areas)
    for label, n, _ in stats.classes:
        assert sum(stats.scores[label]) == n
    scores = duck.execute("SELECT score FROM instances WHERE run_id = ?", [RUN]).fetchnumpy()
    counts = np.histogram(scores["score"], bins=20, range=(0, 1))[0]
    assert stats.scores[None] == counts.tolist()


def test_the_record_is_shown_and_may_be_missing_or_old(
    written: tuple[Report, Path], duck: duckdb.DuckDBPyConnection
) -> None:
    _, folder = written
    page = (folder / "index.html").read_text()
    for shown in (
        "maskrcnn_resnet50_fpn",
        "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
        "<td>score threshold</td><td>0.05</td>",
        "<td>seconds</td><td>100.25 s</td>",
        "<td>images/s</td><td>0.299</td>",
        "<td>800, 1333</td>",
        '<td>model_loaded</td><td class="n">30.10</td>',
        "2 model actors reported",
    ):
        assert shown in page, shown
    stats = gather(duck, RUN)
    missing = report_html(RUN, stats, None, [])
    assert "No run record" in missing and "Run record</h2>\n<table" not in missing
    old = report_html(RUN, stats, {"run_id": RUN, "status": "succeeded", "seconds": 3}, [])
    assert "<td>status</td><td>succeeded</td>" in old and "Start-up timeline" not in old


def test_top_classes_are_said_to_be_a_selection(
    duck: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_module, "TOP_CLASSES", 2)
    monkeypatch.setattr(report_module, "SCORE_CLASSES", 1)
    stats = gather(duck, RUN)
    assert set(stats.scores) == {None, stats.classes[0][0]}
    plot = report_module._classes_plot(stats)
    assert plot is not None and "the largest 2 of 4 classes" in plot.alt


def test_a_run_without_instances_or_errors_and_a_secret_in_a_uri(tmp_path: Path) -> None:
    out, folder = str(tmp_path / "out"), tmp_path / "html"
    coco_like_output(out)  # an output needs an instances table: runs with instances
    secret = "s3://KEY:SECRET@bucket/<b>.jpg"
    nothing = detections_from_full_masks(
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros(0, np.int64),
        scores=np.zeros(0, np.float32),
        masks=np.zeros((0, 48, 64), bool),
    )
    write_output(out, "empty", [("s3://b/1.jpg", (64, 48), nothing)], ("__background__",))
    write_output(
        out,
        "leaky",
        [("s3://b/1.jpg", (64, 48), nothing), (secret, None, None)],
        ("__background__",),
        errors={secret: ("not_found", "object not found")},
    )
    con = connect(out)
    report = write_report(con, "empty", str(folder))
    page = (folder / "index.html").read_text()
    assert report.figures == ("instances_per_image.png",) and not report.has_record
    assert "No instances in this run" in page and "No errors" in page
    assert 'data-images-total="1"' in page
    write_report(con, "leaky", str(folder))
    page = (folder / "index.html").read_text()
    assert "SECRET" not in page and html.escape("s3://***@bucket/<b>.jpg") in page
    con.close()


def test_the_command(output: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["report", "--output", output, "--to", str(tmp_path / "r")]
    assert main([*args, "--run-id", "r50-fpn-v2"]) == 0
    assert "4 plots and index.html" in capsys.readouterr().out
    assert "No run record" in (tmp_path / "r" / "index.html").read_text()
    assert main([*args, "--run-id", "no-such-run"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert main(args) == 2  # two runs and no --run-id


def test_matplotlib_is_imported_only_to_draw() -> None:
    code = (
        "import sys, segpipe.cli, segpipe.analytics.report; sys.exit('matplotlib' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_the_report_loads_in_chromium(written: tuple[Report, Path], tmp_path: Path) -> None:
    _, folder = written
    dom, stderr = loaded_dom(folder / "index.html", tmp_path / "profile")
    assert f'data-images-total="{len(FIGURES)}"' in dom, stderr
    assert f'data-images-loaded="{len(FIGURES)}"' in dom, stderr
    assert dom.count("<img") == len(FIGURES)
