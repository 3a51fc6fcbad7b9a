"""Incremental runs (`--skip-done`): a nightly run over a growing input segments only the
images that no earlier run with the same weights and row-shaping settings got right."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from segpipe.analytics.query import connect
from segpipe.core.fingerprints import checked_fingerprint
from segpipe.job.pipeline import run
from segpipe.job.record import read_record
from segpipe.job.runs import done_in_earlier_runs, resolved
from tests.test_pipeline import config, save_image

SIZE = (96, 72)


def test_skip_done_segments_only_what_earlier_runs_did_not(
    ray_local: None, tmp_path: Path, random_checkpoint: Path
) -> None:
    inputs = tmp_path / "in"
    for i in range(4):
        save_image(inputs / f"a{i}.png", seed=i, size=SIZE)
    broken = inputs / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 cut short")
    output = str(tmp_path / "out")
    night = config(output, random_checkpoint, inputs=(str(inputs),), skip_done=True)

    first = run(replace(night, run_id="night1"))  # nothing earlier: nothing skipped
    assert (first.images, first.images_ok, first.skipped, first.skipped_from) == (5, 4, 0, 0)
    assert read_record(output, "night1")["skipped"] == {"images": 0, "runs": []}

    # The input grows by three images. The second night skips the four ok images; the
    # broken one (an error row, not ok) is tried again with the new ones.
    new = [save_image(inputs / f"b{i}.png", seed=10 + i, size=SIZE) for i in range(3)]
    second = run(replace(night, run_id="night2"))
    assert (second.images, second.skipped, second.skipped_from) == (4, 4, 1)
    assert "4 skipped as done in 1 earlier run" in second.describe()
    record = read_record(output, "night2")
    assert record["status"] == "succeeded" and record["listed_images"] == 8
    assert record["skipped"] == {"images": 4, "runs": ["night1"]}

    con = connect(output)
    uris = {u for (u,) in con.execute("SELECT uri FROM images WHERE run_id = 'night2'").fetchall()}
    assert uris == {p.as_uri() for p in [*new, broken]}
    # Every listed image has exactly one ok row across the nights, or error rows only.
    (ok_once,) = con.execute(
        "SELECT count(*) FROM (SELECT uri FROM images WHERE status = 'ok' GROUP BY uri "
        "HAVING count(*) = 1)"
    ).fetchone()
    assert ok_once == 7

    # A third night would read both; a run with a setting that shapes the rows changed (the
    # score threshold) reuses nothing of either.
    cfg = resolved(replace(night, run_id="night3"))
    same = done_in_earlier_runs(cfg, checked_fingerprint(cfg.model), "9999")
    assert same.runs == ["night1", "night2"] and len(same.files) >= 2
    stricter = replace(cfg, model=replace(cfg.model, score_threshold=0.9))
    other = done_in_earlier_runs(stricter, checked_fingerprint(stricter.model), "9999")
    assert other.runs == [] and other.files == []
    # Runs that began later than the run asking are not its "earlier" runs.
    assert done_in_earlier_runs(cfg, checked_fingerprint(cfg.model), "0").runs == []
