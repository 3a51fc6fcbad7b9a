"""The scale check's arithmetic (segpipe/tools/scale.py), on figures made up here: the check
itself runs the whole job for many minutes (jobs/scale_check.py), not in the suite."""

from __future__ import annotations

import json

from segpipe.config import RunConfig
from segpipe.tools.scale import (
    CommitEvent,
    MemoryMark,
    RunFigures,
    ScaleConfig,
    ScaleResult,
    StageFigures,
    UploadFigures,
    child_spec,
    describe,
    load_result,
    process_kind,
    report,
    run_from_spec,
    tenths,
)


def test_tenths_rates_and_bursts() -> None:
    steady = [(10.0 * k, 100 * k) for k in range(1, 11)]
    assert [t["images_per_s"] for t in tenths(steady, 1000)] == [10.0] * 10
    # Units of 300 images: tenths seen at one poll are one entry.
    burst = [(30.0, 300), (60.0, 600), (90.0, 900), (91.0, 1000)]
    got = tenths(burst, 1000)
    assert [t["tenth"] for t in got] == ["1-3", "4-6", "7-9", "10"]
    assert got[0]["images_per_s"] == 10.0 and got[-1]["images_per_s"] == 100.0
    # A resumed attempt counts from the images committed before it.
    assert tenths([(5.0, 600)], 1000, start=500)[0]["images_per_s"] == 20.0


def test_process_kinds() -> None:
    assert process_kind("python -m segpipe.tools.scale {}", 7, 7) == "driver"
    assert process_kind("ray::MapWorker(MapBatches(Segment)).submit", 8, 7) == "model_actor"
    assert process_kind("ray::MapBatches(load_batch)", 9, 7) == "task_worker"
    assert process_kind("ray::IDLE", 9, 7) == "task_worker"
    assert process_kind("ray::_StatsActor", 10, 7) == "helper_actor"
    assert process_kind("ray::DashboardAgent", 11, 7) == "ray_system"
    assert process_kind("/x/ray/core/src/ray/raylet/raylet --gcs-address=a:1", 12, 7) == (
        "ray_system"
    )


def test_the_run_config_travels_to_the_child() -> None:
    cfg = ScaleConfig(images=10).run_config("s3://out/x", "scale", resume=True)
    assert run_from_spec(child_spec(cfg)) == cfg
    assert isinstance(cfg, RunConfig) and cfg.model.weights == "shapes"


def _run(seconds: float, prior: int = 0, killed: float | None = None) -> RunFigures:
    cpu = {"driver": 1.0, "model_actor": 10.0, "task_worker": 5.0, "s3_server": 2.0}
    commits = [
        CommitEvent(30.0 + 10 * k, prior + 100 * k, 100, {k2: v * k for k2, v in cpu.items()})
        for k in range(1, 11 - prior // 100)
    ]
    mark = MemoryMark(0.1, 100, 40.0, 500.0, 2000.0, 900.0, 500.0, 1.0, 500.0, 2000.0)
    return RunFigures(
        run_id="scale",
        output="s3://scale-out/main",
        resume=prior > 0,
        exit_code=0 if killed is None else -9,
        killed_at_s=killed,
        seconds=seconds,
        prior_images=prior,
        committed_images=commits[-1].images,
        events={"first_decode_task": 30.0, "first_commit": 40.0},
        commits=commits,
        marks=[mark],
        model_marks=[mark],
        peaks_mib={"driver": 520.0, "workers_total": 2500.0, "largest_worker": 900.0},
        cpu_s={k: v * 10 for k, v in cpu.items()},
        object_store={},
        store_samples=0,
        store_error=None,
        titles={},
        event_cpu={"first_decode_task": {k: 0.0 for k in cpu}},
        model_progress=[(35.0, 100), (135.0, 1000)],
        rss_series=[(35.0, 500.0, 2000.0, 500.0)],
        summary=None,
        record={"status": "succeeded", "counts": {"images": 1000}},
        files={"images": 10, "instances": 10},
    )


def test_report_and_its_json() -> None:
    result = ScaleResult(
        config=dict(ScaleConfig(images=1000, images_per_file=100).__dict__),
        machine={"cpus": 2, "load_average": [1.0, 1, 1], "load_average_end": [1.0, 1, 1]},
        upload=UploadFigures(1000, 10**6, 2.0, 500.0, 4, 2.0, 100.0),
        run=_run(140.0),
        killed=_run(90.0, killed=80.0),
        resumed=_run(100.0, prior=500),
        stages=StageFigures(
            64,
            {"read": 2.0, "decode": 0.1, "model": 14.0, "encode": 0.1, "write": 0.1, "commit": 0.3},
            {},
            2.0,
            30.0,
            5.0,
            0.9,
        ),
        rows={"main_rows": 1000, "main_distinct": 1000},
        seconds=500.0,
    )
    rep = report(result)
    assert rep["steady_images_per_s"] == round(1000 / (130.0 - 30.0), 2)
    assert rep["files"]["bound"] == 10
    # From the first decode to the last commit: (1 + 10 + 5) s x 10 over 1000 images.
    assert rep["cost_per_image"]["run_total_ms"] == 160.0
    assert rep["cost_per_image"]["non_model_ms"] == 146.0
    assert rep["memory"]["driver"]["ratio"] == 1.04 and rep["memory"]["driver"]["flat_within_10pct"]
    assert not rep["memory"]["workers_total"]["flat_within_10pct"]  # 2000 -> 2500
    assert rep["resume"]["remaining"] == 500
    assert "estimate_100k" in rep
    again = load_result(json.loads(json.dumps(result.as_json())))
    assert report(again) == rep
    assert "resume: killed after 80.0 s" in describe(again)
