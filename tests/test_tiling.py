"""Tiled inference through the whole job (``segpipe run --tile``), with the shipped model.

Scenes of 1024x768 from ``segpipe.tools.scenes`` (shapes at the sizes the model was trained
on, exact ground truth), one of them with every shape placed across a tile seam, and one
ordinary shapes image smaller than a tile, are run twice on the embedded Ray: tiled, and
whole as before. Read back from Parquet with DuckDB and scored against the truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segpipe.analytics.evaluation import evaluate, predictions
from segpipe.analytics.query import connect
from segpipe.cli import main
from segpipe.core.encode import decode_mask
from segpipe.core.tiles import tile_grid
from segpipe.job.record import read_record
from segpipe.tools.scenes import seam_scene, write_scenes
from segpipe.tools.shapes import generate_image

HEIGHT, WIDTH, TILE, OVERLAP = 768, 1024, 256, 96
TILE_ABOVE = 40_000  # the small image (202x243) is over it, but within one tile
SMALL = (1, 15)  # seed, index of a held-out shapes image of 202x243 with 5 shapes
SEAM_SEED = 4


def seams() -> tuple[list[int], list[int]]:
    """The tiles' far edges inside the image: where a shape is cut by a tile's border."""
    tiles = tile_grid(HEIGHT, WIDTH, TILE, OVERLAP)
    xs = sorted({t.x + t.width for t in tiles} - {WIDTH})
    ys = sorted({t.y + t.height for t in tiles} - {HEIGHT})
    return xs, ys


@pytest.fixture(scope="module")
def tiled_runs(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiling")
    images = root / "images"
    scenes_gt = write_scenes(str(root / "scenes"), seed=3, count=2, height=HEIGHT, width=WIDTH)
    images.mkdir()
    for entry in scenes_gt["images"]:
        (root / "scenes" / entry["file_name"]).rename(images / entry["file_name"])
    seam = seam_scene(SEAM_SEED, 0, HEIGHT, WIDTH, *seams())
    (images / seam.file_name_as()).write_bytes(seam.encoded())
    small = generate_image(*SMALL)
    (images / small.file_name).write_bytes(small.encoded("png"))
    output = root / "out"
    common = ["run", "--input", str(images), "--output", str(output), "--weights", "shapes"]
    # One image a model call: an image's detections do not depend on its batch's others.
    common += ["--device", "cpu", "--batch-size", "1"]
    tiled = ["--tile", str(TILE), "--tile-overlap", str(OVERLAP), "--tile-above", str(TILE_ABOVE)]
    assert main([*common, "--run-id", "tiled", *tiled]) == 0
    assert main([*common, "--run-id", "whole"]) == 0
    return {
        "output": str(output),
        "images": images,
        "scenes_gt": scenes_gt,
        "seam": seam,
        "small": small,
    }


def rows(output: str, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    con = connect(output)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_images_say_how_they_went_through(tiled_runs: dict[str, Any]) -> None:
    per_scene = len(tile_grid(HEIGHT, WIDTH, TILE, OVERLAP))
    got = rows(
        tiled_runs["output"],
        "SELECT run_id, width, tiles, status FROM images ORDER BY run_id, width, uri",
        [],
    )
    small_width = tiled_runs["small"].pixels.shape[1]
    assert got == [
        ("tiled", small_width, 0, "ok"),
        *[("tiled", WIDTH, per_scene, "ok")] * 3,
        ("whole", small_width, 0, "ok"),
        *[("whole", WIDTH, 0, "ok")] * 3,
    ]
    record = read_record(tiled_runs["output"], "tiled")
    assert record["counts"]["tiled_images"] == 3
    assert record["counts"]["tiles"] == 3 * per_scene
    assert record["config"]["tiles"]["tile"] == TILE
    assert read_record(tiled_runs["output"], "whole")["counts"]["tiles"] == 0


def test_shapes_across_seams_are_found_once(tiled_runs: dict[str, Any]) -> None:
    """Every shape is one instance of its class with IoU >= 0.8, and no confident instance
    is a part of a shape (a tile's cut view left unmerged). The model may still call a
    shape by two classes where it sees it whole, as it does on any image."""
    seam = tiled_runs["seam"]
    uri = (tiled_runs["images"] / seam.file_name_as()).as_uri()
    found = rows(
        tiled_runs["output"],
        "SELECT label, mask_rle FROM instances WHERE run_id = 'tiled' AND uri = ? AND score >= 0.5",
        [uri],
    )
    masks = [(label, decode_mask(rle, HEIGHT, WIDTH).astype(bool)) for label, rle in found]
    assert len(seam.shapes) >= 12
    best = np.zeros(len(masks))
    for shape in seam.shapes:
        truth = np.zeros((HEIGHT, WIDTH), dtype=bool)
        (x, y), (h, w) = shape.origin, shape.window.shape
        truth[y : y + h, x : x + w] = shape.window
        ious = np.array(
            [np.count_nonzero(truth & m) / np.count_nonzero(truth | m) for _, m in masks]
        )
        best = np.maximum(best, ious)
        mine = [
            k for k, (label, _) in enumerate(masks) if label == shape.category and ious[k] >= 0.5
        ]
        assert len(mine) == 1, (shape.category, shape.centre, ious[mine])
        assert ious[mine[0]] >= 0.8, (shape.category, shape.centre, ious[mine[0]])
    assert best.min() >= 0.8, [(masks[k][0], best[k]) for k in np.flatnonzero(best < 0.8)]


def test_tiling_finds_what_the_whole_image_loses(tiled_runs: dict[str, Any]) -> None:
    gt = tiled_runs["scenes_gt"]
    con = connect(tiled_runs["output"])
    try:
        ap = {}
        for run in ("tiled", "whole"):
            found = predictions(con, gt, run_id=run)
            assert found.images_matched == 2
            metrics = evaluate(gt, found.results)
            ap[run] = (metrics.stats["bbox"]["AP50"], metrics.stats["segm"]["AP50"])
    finally:
        con.close()
    print(f"\nscenes AP@0.5 (box, mask): tiled {ap['tiled']}, whole {ap['whole']}")
    assert min(ap["tiled"]) >= 0.85
    assert max(ap["whole"]) <= min(ap["tiled"]) - 0.3


def test_an_image_within_one_tile_gives_the_same_rows(tiled_runs: dict[str, Any]) -> None:
    uri = (tiled_runs["images"] / tiled_runs["small"].file_name).as_uri()
    sql = (
        "SELECT instance_id, label, score, box_x0, box_y0, box_x1, box_y1, mask_rle, "
        "mask_area FROM instances WHERE run_id = ? AND uri = ? ORDER BY instance_id"
    )
    tiled = rows(tiled_runs["output"], sql, ["tiled", uri])
    assert tiled and tiled == rows(tiled_runs["output"], sql, ["whole", uri])


def test_tile_settings_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert main([*args, "--tile", "32"]) == 2
    assert "tile must be 0 (off) or at least 64 pixels, got 32" in capsys.readouterr().err
    assert main([*args, "--tile", "256", "--tile-overlap", "200"]) == 2
    assert "tile_overlap must be in [0, tile / 2]" in capsys.readouterr().err


def test_runs_recorded_before_tiling_count_as_untiled(tmp_path: Path) -> None:
    """A record written before the tile settings existed lacks them: it ran untiled, so an
    untiled run may resume it or reuse its rows (--skip-done), and a tiled one may not."""
    from dataclasses import replace

    from segpipe.config import RunConfig, TileConfig
    from segpipe.job.record import public_config
    from segpipe.job.runs import _SAME_ON_RESUME, settings_changes

    cfg = RunConfig(output=str(tmp_path / "o"), inputs=(str(tmp_path),))
    old = {"config": public_config(cfg), "weights": {}}
    del old["config"]["tiles"]
    assert settings_changes(cfg, {}, old, _SAME_ON_RESUME) == []
    tiled = replace(cfg, tiles=TileConfig(tile=512))
    (change,) = settings_changes(tiled, {}, old, _SAME_ON_RESUME)
    assert change.startswith("tiles: {'tile': 0,")
