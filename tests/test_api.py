"""segpipe from Python: the README's example run as it is written, segment() against the
job's own rows, the settings' routing, and the tables' schema version."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

import segpipe
from segpipe import layout
from segpipe.api import _config
from segpipe.config import ModelConfig, RunConfig
from segpipe.job.runs import RunSummary
from segpipe.schema import (
    IMAGES_SCHEMA,
    INSTANCES_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SchemaVersionError,
    check_schema_version,
    image_id,
)
from segpipe.tools.shapes import generate_image

README = Path(__file__).resolve().parents[1] / "README.md"
# The columns that segment() and a run agree on (run_id is each one's own).
SAME = ["image_id", "uri", "instance_id", "label", "score", "box_x0", "box_y1", "mask_rle"]


def readme_example() -> str:
    section = README.read_text().split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def photos(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = folder / f"shapes-{i}.png"
        Image.fromarray(generate_image(7, i).pixels).save(path)
        paths.append(path)
    return paths


@dataclass
class Example:
    folder: Path
    images: list[Path]
    output: Path
    confident: Path
    scope: dict[str, object]


@pytest.fixture(scope="module")
def example(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Example:
    """The README's example, run once as it is written, its paths swapped for temporary
    ones: segpipe.run over a folder, segpipe.connect, then segpipe.segment over the same
    files read by Ray (bytes given), its confident rows written with Ray's own writer."""
    tmp_path = tmp_path_factory.mktemp("example")
    images = photos(tmp_path / "photos", 4)
    code = readme_example()
    places = {"/data/photos": tmp_path / "photos", "/data/segmented": tmp_path / "out"}
    places["/data/confident"] = tmp_path / "confident"
    for old, new in places.items():
        assert old in code, old
        code = code.replace(old, str(new))
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)  # our own README
    return Example(tmp_path / "photos", images, tmp_path / "out", tmp_path / "confident", scope)


def test_the_readme_example_runs_and_segment_gives_the_rows_of_a_run(example: Example) -> None:
    summary = example.scope["summary"]
    assert isinstance(summary, RunSummary) and (summary.images, summary.images_ok) == (4, 4)
    con = segpipe.connect(str(example.output))
    run_rows = con.sql(
        f"SELECT {', '.join(SAME)} FROM instances WHERE score >= 0.9 ORDER BY image_id, instance_id"
    ).to_arrow_table()
    assert run_rows.num_rows >= 4
    written = pq.read_table(example.confident)
    assert written.column_names == INSTANCES_SCHEMA.names
    got = written.select(SAME).sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
    assert got.cast(run_rows.schema).to_pylist() == run_rows.to_pylist()
    assert set(got.column("uri").to_pylist()) <= {p.as_uri() for p in example.images}


def test_segment_over_uris_gives_one_images_row_each_failures_included(
    ray_local: None, tmp_path: Path
) -> None:
    """URIs (no bytes): a missing file and a relative path are error rows, as in a run."""
    import ray

    (good,) = photos(tmp_path / "in", 1)
    missing = tmp_path / "in" / "gone.png"
    items = [{"where": str(good)}, {"where": str(missing)}, {"where": "relative/x.png"}]
    ds = segpipe.segment(
        ray.data.from_items(items),
        uri_column="where",
        table="images",
        weights="shapes",
        run_id="adhoc",
        batch_size=2,
    )
    rows = {r["uri"]: r for r in ds.iter_rows()}
    assert set(rows) == {good.as_uri(), missing.as_uri(), "relative/x.png"}
    assert rows[good.as_uri()]["status"] == "ok" and rows[good.as_uri()]["num_instances"] > 0
    assert rows[missing.as_uri()]["error_code"] == "not_found"
    assert rows["relative/x.png"]["error_code"] == "bad_uri"
    assert {r["run_id"] for r in rows.values()} == {"adhoc"}
    assert rows[good.as_uri()]["image_id"] == image_id(good.as_uri())
    assert set(rows[good.as_uri()]) == set(IMAGES_SCHEMA.names)


def test_segment_refuses_what_it_cannot_use(ray_local: None) -> None:
    import ray

    ds = ray.data.from_items([{"uri": "/x.png"}])
    with pytest.raises(TypeError, match="takes no setting 'output'"):
        segpipe.segment(ds, output="/tmp/x")
    with pytest.raises(ValueError, match="no column 'path'"):
        segpipe.segment(ds, uri_column="path")
    with pytest.raises(ValueError, match="table must be one of"):
        segpipe.segment(ds, table="boxes")


def test_settings_go_where_they_are_declared() -> None:
    cfg = _config(None, {"output": "/o", "inputs": ["/a", "/b"], "score_threshold": 0.7})
    assert cfg.inputs == ("/a", "/b") and cfg.model.score_threshold == 0.7
    cfg = _config(cfg, {"full_resolution": True, "run_id": "r1"})
    assert cfg.decode.full_resolution and cfg.run_id == "r1" and cfg.model.score_threshold == 0.7
    cfg = _config(cfg, {"tile": 512, "tile_overlap": 64})
    assert (cfg.tiles.tile, cfg.tiles.tile_overlap, cfg.decode.full_resolution) == (512, 64, True)
    with pytest.raises(TypeError, match="unknown setting 'scor_threshold'"):
        _config(None, {"output": "/o", "inputs": ["/a"], "scor_threshold": 0.7})
    with pytest.raises(TypeError, match="either model= or"):
        _config(None, {"output": "/o", "inputs": ["/a"], "model": ModelConfig(), "arch": "auto"})
    with pytest.raises(TypeError, match="needs output="):
        _config(None, {"inputs": ["/a"]})
    with pytest.raises(ValueError, match="either input URIs or a manifest"):
        segpipe.run(output="/o")
    assert isinstance(_config(RunConfig(output="/o", inputs=("/a",)), {}), RunConfig)


def test_schema_versions_are_written_and_checked(example: Example, tmp_path: Path) -> None:
    """Every file carries the schema version; a run record of another major makes readers
    and new runs refuse the output (a copy of the example's), naming the run."""
    output = tmp_path / "out"
    shutil.copytree(example.output, output)
    files = sorted(output.glob("*/run_id=photos/*.parquet"))
    assert {f.parent.parent.name for f in files} == {"images", "instances"}
    for f in files:
        metadata = pq.read_schema(f).metadata
        assert metadata[SCHEMA_VERSION_KEY.encode()] == SCHEMA_VERSION.encode()
    record = json.loads(Path(layout.record(str(output), "photos")).read_text())
    assert record["schema_version"] == SCHEMA_VERSION

    future = {**record, "run_id": "v2", "schema_version": "2.0"}
    Path(layout.record(str(output), "v2")).write_text(json.dumps(future))
    with pytest.raises(SchemaVersionError, match=r"run v2 has tables of schema version 2\.0"):
        segpipe.connect(str(output))
    with pytest.raises(SchemaVersionError, match="run v2"):
        segpipe.run(inputs=[str(example.folder)], output=str(output), run_id="v3")
    check_schema_version(None, "a run from before versions")  # 1.0
    check_schema_version("1.7", "a run of a newer minor")
