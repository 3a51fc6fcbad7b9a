"""The error budget (segpipe/job/budget.py): a run mostly of error rows fails, at its end or
early; a model actor whose device is broken ends itself instead of failing every image."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from segpipe import cli
from segpipe.config import ModelConfig, RunConfig
from segpipe.job import budget
from segpipe.job.budget import ErrorWatch, over_budget
from segpipe.job.commit import WriteCounts, units
from segpipe.job.pipeline import run
from segpipe.job.runs import ErrorRateError
from segpipe.job.stages import DEVICE_BROKEN_EXIT, Segment
from segpipe.job.writer import error_counts, write_rows
from segpipe.schema import MODEL_ERROR, STATUS_ERROR
from tests.test_lookups import unit_rows
from tests.test_pipeline import save_image

RUN = "budget"


def with_errors(rows: pa.Table, codes: dict[int, str]) -> pa.Table:
    """``rows`` with the images at the given positions turned into error rows of a code."""
    status = rows.column("status").to_pylist()
    code = rows.column("error_code").to_pylist()
    for i, c in codes.items():
        status[i], code[i] = STATUS_ERROR, c
    rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(status))
    index = rows.schema.get_field_index("error_code")
    return rows.set_column(index, "error_code", pa.array(code, type=pa.string()))


def test_units_count_their_errors_by_code_and_add_up(tmp_path: Path) -> None:
    a = with_errors(unit_rows(RUN, 6, 1, seed=1), {0: "not_found", 2: "not_found", 5: "corrupt"})
    b = with_errors(unit_rows(RUN, 4, 1, seed=2), {1: "not_found"})
    first = write_rows(a, str(tmp_path), partition_by=("run_id",))
    second = write_rows(b, str(tmp_path), partition_by=("run_id",))
    assert first.errors == {"not_found": 2, "corrupt": 1}
    uris = a.column("uri").to_pylist()
    assert first.error_examples["not_found"] == min(uris[0], uris[2])
    total = first + second
    assert (total.images, total.images_error) == (10, 4)
    assert total.errors == {"not_found": 3, "corrupt": 1}
    both = [uris[0], uris[2], b.column("uri")[1].as_py()]
    assert total.error_examples["not_found"] == min(both)
    # The markers carry them; markers written before they existed read as no errors.
    assert sum((u.counts for u in units(str(tmp_path), RUN)), WriteCounts()) == total
    assert WriteCounts(**json.loads('{"images": 3, "images_error": 1}')).errors == {}


def test_error_examples_carry_no_credentials() -> None:
    rows = with_errors(unit_rows(RUN, 2, 1, seed=7), {0: "forbidden", 1: "forbidden"})
    secret = "https://reader:s3cr3t@images.example/a.jpg?X-Amz-Signature=abc"
    rows = rows.set_column(2, "uri", pa.array([secret, "https://zz.example/b.jpg"]))
    counts, examples = error_counts(rows)
    assert counts == {"forbidden": 2}
    assert examples == {"forbidden": "https://***@images.example/a.jpg"}


def test_over_budget_names_the_common_codes_with_an_example() -> None:
    counts = WriteCounts(
        images=10,
        images_error=6,
        errors={"not_found": 4, "permission_denied": 2},
        error_examples={"not_found": "s3://b/a.jpg", "permission_denied": "s3://b/p.jpg"},
    )
    reason = over_budget(counts, 0.5)
    assert reason is not None
    assert "6 of 10 images are errors (60.0%, above --max-error-rate 0.5)" in reason
    assert "not_found 4 (e.g. s3://b/a.jpg), permission_denied 2 (e.g. s3://b/p.jpg)" in reason
    assert over_budget(counts, 0.6) is None  # at the rate is within it
    assert over_budget(counts, 1.0) is None
    assert over_budget(WriteCounts(), 0.0) is None


def test_the_watch_interrupts_the_main_thread_once_enough_is_committed(tmp_path: Path) -> None:
    out = str(tmp_path)
    earlier = write_rows(
        with_errors(unit_rows(RUN, 8, 1, seed=3), dict.fromkeys(range(8), "corrupt")),
        out,
        partition_by=("run_id",),
    )
    assert earlier.images_error == 8
    earlier_units = {u.stem for u in units(out, RUN)}
    watch = ErrorWatch(out, RUN, 0.5, after=6, earlier=earlier_units, interval=0.05)
    with pytest.raises(KeyboardInterrupt), watch:
        # Errors committed by an earlier attempt don't count: nothing happens yet.
        time.sleep(0.5)
        assert watch.stopped is None
        mostly_bad = {i: "not_found" for i in range(4)}
        write_rows(with_errors(unit_rows(RUN, 5, 1, seed=4), mostly_bad), out, partition_by=())
        time.sleep(0.5)  # 5 images: not yet enough to judge
        assert watch.stopped is None
        write_rows(
            with_errors(unit_rows(RUN, 3, 1, seed=5), {0: "not_found"}), out, partition_by=()
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    assert watch.stopped is not None
    assert "5 of 8 images are errors" in watch.stopped
    assert "not_found 5" in watch.stopped


def test_a_watch_within_the_budget_never_interrupts(tmp_path: Path) -> None:
    out = str(tmp_path)
    with ErrorWatch(out, RUN, 0.5, after=2, earlier=set(), interval=0.05) as watch:
        write_rows(with_errors(unit_rows(RUN, 4, 1, seed=6), {0: "corrupt"}), out, partition_by=())
        time.sleep(0.5)
    time.sleep(0.2)
    assert watch.stopped is None and watch.counts.images == 4


TINY = ModelConfig(weights="shapes", device="cpu", min_size=48, max_size=64)


def test_a_run_that_ends_mostly_failed_fails(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [save_image(tmp_path / "in" / f"{k}.png", k, (64, 48)).as_uri() for k in range(3)]
    missing = [(tmp_path / "wrong-prefix" / f"{k:03d}.png").as_uri() for k in range(30)]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(good + missing) + "\n")
    out = tmp_path / "out"
    code = cli.main(
        [
            "run", "--manifest", str(manifest), "--output", str(out), "--run-id", "mostly-bad",
            "--weights", "shapes", "--device", "cpu", "--min-size", "48", "--max-size", "64",
        ]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "30 of 33 images are errors (90.9%, above --max-error-rate 0.5)" in err
    assert f"not_found 30 (e.g. {min(missing)})" in err
    record = json.loads((out / "_runs" / "mostly-bad.json").read_text())
    assert record["status"] == "failed" and "ErrorRateError" in record["error"]
    assert record["counts"]["errors"] == {"not_found": 30}
    # The rows stay committed, errors included.
    assert sum(u.counts.images for u in units(str(out), "mostly-bad")) == 33


def test_a_run_over_the_budget_stops_early_and_resume_goes_on(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget, "WATCH_INTERVAL_S", 0.2)
    missing = [tmp_path / "late" / f"{k:04d}.png" for k in range(200)]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(p.as_uri() for p in missing) + "\n")
    cfg = RunConfig(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        run_id="early",
        model=TINY,
        images_per_file=2,
        error_check_after=8,
    )
    with pytest.raises(ErrorRateError, match=r"stopped early: .* not_found"):
        run(cfg)
    committed = sum(u.counts.images for u in units(cfg.output, "early"))
    assert 8 <= committed < len(missing)
    record = json.loads((tmp_path / "out" / "_runs" / "early.json").read_text())
    assert record["status"] == "failed" and "stopped early" in record["error"]
    # The cause fixed (the files are there now), --resume goes on: the errors the earlier
    # attempt committed don't stop it, and the whole run ends within the budget.
    for k, path in enumerate(missing):
        save_image(path, k % 7, (64, 48))
    summary = run(replace(cfg, resume=True, images_per_file=100))
    assert summary.images == len(missing) and summary.images_error == committed
    assert summary.resumed == committed


def test_a_broken_device_ends_the_actor_and_a_bad_image_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    segment = Segment(TINY, run_id=RUN)
    batch = {
        "uri": np.array(["file:///a.png", "file:///b.png"], dtype=object),
        "image_id": np.array(["a", "b"], dtype=object),
        "width": np.array([8, 8]),
        "height": np.array([8, 8]),
        "status": np.array(["ok", "ok"], dtype=object),
        "error_code": np.array([None, None], dtype=object),
        "error": np.array([None, None], dtype=object),
        "pixels": [np.zeros((8, 8, 3), dtype=np.uint8)] * 2,
    }

    class Failing:
        categories = segment.segmenter.categories

        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def __call__(self, *args: object) -> None:
            raise self.exc

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(segment, "segmenter", Failing(oom))
    rows = segment._segment(batch)
    assert rows.column("error_code").to_pylist() == [MODEL_ERROR, MODEL_ERROR]

    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    sticky = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(segment, "segmenter", Failing(sticky))
    monkeypatch.setattr("os._exit", exit_)
    with pytest.raises(SystemExit):
        segment._segment(batch)
    assert exits == [DEVICE_BROKEN_EXIT]
