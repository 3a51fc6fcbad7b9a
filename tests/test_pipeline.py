"""`segpipe run` end to end on an embedded Ray: local files, S3, manifests, fail-fast checks."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from segpipe.analytics.query import connect
from segpipe.cli import main
from segpipe.config import DecodeConfig, ModelConfig, RunConfig
from segpipe.core.decode import DecodedImage, decode_image
from segpipe.core.model import Segmenter
from segpipe.core.rows import ImageRef
from segpipe.io import sha256_hex
from segpipe.job.pipeline import run
from segpipe.job.record import read_record
from segpipe.job.runs import OutputError
from segpipe.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, image_id
from segpipe.tools.samples import sample_image
from tests.conftest import FAKE_SECRET
from tests.masks import instances_rows

SMALL = dict(min_size=96, max_size=160, max_detections=6)
SIZES = [(160, 120), (90, 150), (200, 100), (64, 64)]


def save_image(path: Path, seed: int, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_image(seed, size).save(path)
    return path


def config(output: str, checkpoint: Path, **kwargs: object) -> RunConfig:
    model = ModelConfig(weights=str(checkpoint), device="cpu", **SMALL)  # type: ignore[arg-type]
    return RunConfig(output=output, model=model, batch_size=1, **kwargs)  # type: ignore[arg-type]


def core_instances(
    uris: list[str], checkpoint: Path, run_id: str, full_resolution: bool = False
) -> pa.Table:
    """What the core (no Ray) gives for the same images, single-threaded like the actor:
    decoded at the model's scale (or in full), detections in full-resolution coordinates."""
    fit = None if full_resolution else (SMALL["min_size"], SMALL["max_size"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        segmenter = Segmenter(ModelConfig(weights=str(checkpoint), device="cpu", **SMALL))
        tables = []
        for uri in uris:
            with fsspec.open(uri, "rb") as f:
                image = decode_image(f.read(), fit=fit)
            assert isinstance(image, DecodedImage)
            ref = ImageRef(run_id, image_id(uri), uri, image.width, image.height)
            found = segmenter([image.pixels], [(image.height, image.width)])
            tables.append(instances_rows([ref], found, segmenter.categories))
    finally:
        torch.set_num_threads(threads)
    return pa.concat_tables(tables)


def sorted_rows(table: pa.Table) -> list[dict[str, object]]:
    return table.sort_by([("uri", "ascending"), ("instance_id", "ascending")]).to_pylist()


def test_local_folder_end_to_end(ray_local: None, tmp_path: Path, random_checkpoint: Path) -> None:
    inputs = tmp_path / "in"
    good = [
        save_image(inputs / f"img{i}.{'jpg' if i % 2 else 'png'}", seed=i, size=size)
        for i, size in enumerate(SIZES[:3])
    ]
    good.append(save_image(inputs / "nested" / "deeper.JPEG", seed=9, size=SIZES[3]))
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 cut short")
    (inputs / "notes.txt").write_text("not an image, and not listed")
    output = str(tmp_path / "out")

    cfg = config(output, random_checkpoint, inputs=(str(inputs),), run_id="local")
    summary = run(replace(cfg, images_per_file=2))
    assert (summary.images, summary.images_ok, summary.images_error) == (5, 4, 1)
    # Each write task takes >= 2 images, so each table has at most ceil(5 / 2) files.
    for table in ("images", "instances"):
        files = list((Path(output) / table / "run_id=local").glob("*.parquet"))
        assert 1 <= len(files) <= 3, files
    assert summary.files == len(list(Path(output).glob("*/run_id=local/*.parquet")))

    con = connect(output)
    images = con.sql("SELECT * FROM images ORDER BY uri").to_arrow_table()
    assert images.num_rows == 5
    assert set(IMAGES_SCHEMA.names) <= set(images.column_names)
    by_uri = {r["uri"]: r for r in images.to_pylist()}
    broken = by_uri[(inputs / "broken.jpg").as_uri()]
    assert broken["status"] == "error" and broken["error_code"] and broken["error"]
    assert broken["run_id"] == "local"
    uris = [p.as_uri() for p in good]
    for uri, size in zip(uris, SIZES, strict=True):
        assert (by_uri[uri]["width"], by_uri[uri]["height"]) == size
        assert by_uri[uri]["image_id"] == image_id(uri)

    columns = ", ".join(INSTANCES_SCHEMA.names)
    got = con.sql(f"SELECT {columns} FROM instances").to_arrow_table()
    expected = core_instances(uris, random_checkpoint, run_id="local")
    assert got.num_rows == expected.num_rows == summary.instances > 0
    assert sorted_rows(got) == sorted_rows(expected)
    counts = con.execute("SELECT sum(num_instances) FROM images").fetchone()
    assert counts is not None and counts[0] == got.num_rows

    record = read_record(output, "local")
    assert record["status"] == "succeeded"
    assert record["counts"]["images"] == 5 and record["listed_images"] == 5
    assert record["weights"]["sha256"] == sha256_hex(random_checkpoint.read_bytes())
    assert record["versions"]["torch"] and record["seconds"] > 0
    # The start-up timeline: the driver's steps and the model actors', in seconds
    # since the driver process started; the summary's steady rate starts at the first batch.
    marks = record["timeline"]
    steps = ["prepare", "checked", "leased", "plan_started"]
    steps += ["actor_started", "model_loaded", "first_batch_in", "first_batch_out", "finished"]
    assert sorted(steps, key=marks.__getitem__) == steps and record["timeline_actors"] >= 1
    # Ray starts beside the checks, so it may be up before or after the listing (before it
    # here: a runtime already up, which could be a cluster, is looked at before listing).
    for step in ("listed", "ray_started"):
        assert marks["leased"] <= marks[step] <= marks["plan_started"], (step, marks)
    assert summary.startup_s == marks["first_batch_out"] and summary.steady_images_per_s
    assert "start-up" in summary.describe()

    # The same run id again, or an unnamed run into a used output: refused before any work.
    with pytest.raises(OutputError, match="already exists"):
        run(config(output, random_checkpoint, inputs=(str(inputs),), run_id="local"))
    with pytest.raises(OutputError, match="already holds results"):
        run(config(output, random_checkpoint, inputs=(str(inputs),)))


def test_s3_input_and_output(ray_local: None, s3_env: str, random_checkpoint: Path) -> None:
    fs = fsspec.filesystem("s3")
    fs.makedirs("segpipe-in", exist_ok=True)
    fs.makedirs("segpipe-out", exist_ok=True)
    for i, size in enumerate(SIZES[:2]):
        local = save_image(Path(f"/tmp/segpipe-s3-{i}.png"), seed=20 + i, size=size)
        fs.put_file(str(local), f"segpipe-in/photos/p{i}.png")
        local.unlink()
    fs.pipe_file("segpipe-in/photos/truncated.png", b"\x89PNG\r\n\x1a\n\x00\x00")

    output = "s3://segpipe-out/run1"
    # Decoding every pixel (--full-resolution): the rows are those of a full decode, as
    # torchvision would see the images (p0, 160x120, is larger than the model's input).
    cfg = config(
        output,
        random_checkpoint,
        inputs=("s3://segpipe-in/photos/",),
        run_id="s3",
        decode=DecodeConfig(full_resolution=True),
    )
    summary = run(cfg)
    assert (summary.images, summary.images_ok, summary.images_error) == (3, 2, 1)

    con = connect(output)
    rows = con.execute("SELECT uri, status FROM images ORDER BY uri").fetchall()
    assert rows == [
        ("s3://segpipe-in/photos/p0.png", "ok"),
        ("s3://segpipe-in/photos/p1.png", "ok"),
        ("s3://segpipe-in/photos/truncated.png", "error"),
    ]
    got = con.sql(f"SELECT {', '.join(INSTANCES_SCHEMA.names)} FROM instances").to_arrow_table()
    uris = ["s3://segpipe-in/photos/p0.png", "s3://segpipe-in/photos/p1.png"]
    expected = core_instances(uris, random_checkpoint, "s3", full_resolution=True)
    assert got.num_rows == summary.instances == expected.num_rows
    assert sorted_rows(got) == sorted_rows(expected)
    assert fs.exists("segpipe-out/run1/_runs/s3.json")
    for path in fs.find("segpipe-out/run1"):
        assert FAKE_SECRET.encode() not in fs.cat_file(path), path


def test_manifest_with_carried_columns(
    ray_local: None, tmp_path: Path, random_checkpoint: Path
) -> None:
    a = save_image(tmp_path / "a.png", seed=31, size=(120, 80))
    b = save_image(tmp_path / "b.jpg", seed=32, size=(70, 140))
    (tmp_path / "bad.png").write_bytes(b"<!DOCTYPE html><html>oops</html>")
    manifest = tmp_path / "manifest.csv"
    rows = [
        ("uri", "source", "shard"),
        (str(a), "camera-1", "7"),
        (b.as_uri(), "camera-2", "8"),
        (str(tmp_path / "gone.png"), "camera-3", "9"),
        ("relative/path.png", "camera-4", "10"),
        (str(tmp_path / "bad.png"), "camera-5", "11"),
    ]
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    output = str(tmp_path / "out")
    cfg = config(
        output,
        random_checkpoint,
        manifest=str(manifest),
        run_id="manifest",
        partition_by=("run_id", "label"),
        max_error_rate=1.0,  # 3 of the 5 rows are errors on purpose
    )
    summary = run(cfg)
    assert (summary.images, summary.images_ok, summary.images_error) == (5, 2, 3)

    con = connect(output)
    got = con.execute("SELECT source, shard, status, error_code, uri FROM images ORDER BY source")
    assert got.fetchall() == [
        ("camera-1", 7, "ok", None, a.as_uri()),
        ("camera-2", 8, "ok", None, b.as_uri()),
        ("camera-3", 9, "error", "not_found", (tmp_path / "gone.png").as_uri()),
        ("camera-4", 10, "error", "bad_uri", "relative/path.png"),
        ("camera-5", 11, "error", "not_an_image", (tmp_path / "bad.png").as_uri()),
    ]
    # Instances are partitioned by label; images (which have no label) by run only.
    label_dirs = {p.name for p in (Path(output) / "instances" / "run_id=manifest").iterdir()}
    assert label_dirs and all(d.startswith("label=") for d in label_dirs)
    per_label = con.execute("SELECT label, count(*) FROM instances GROUP BY label").fetchall()
    assert sum(n for _, n in per_label) == summary.instances
    # Values are percent-encoded in folder names ("N/A" -> "N%2FA") and decoded by readers.
    assert {f"label={label}" for label, _ in per_label} == {unquote(d) for d in label_dirs}


def test_parquet_and_text_manifests(
    ray_local: None, tmp_path: Path, random_checkpoint: Path
) -> None:
    images = [save_image(tmp_path / f"m{i}.png", seed=40 + i, size=SIZES[i]) for i in range(2)]
    parquet = tmp_path / "list.parquet"
    pq.write_table(
        pa.table({"path": [str(p) for p in images], "weight": pa.array([1.5, 2.5])}), parquet
    )
    text = tmp_path / "list.txt"
    text.write_text("\n".join(p.as_uri() for p in images) + "\n\n")
    output = str(tmp_path / "out")

    run(config(output, random_checkpoint, manifest=str(parquet), uri_column="path", run_id="pq"))
    run(config(output, random_checkpoint, manifest=str(text), run_id="txt"))

    con = connect(output)
    got = con.execute("SELECT run_id, count(*), sum(weight) FROM images GROUP BY 1 ORDER BY 1")
    assert got.fetchall() == [("pq", 2, 4.0), ("txt", 2, None)]
    # Two runs over the same images: same image ids, comparable side by side.
    same = con.execute(
        "SELECT count(*) FROM images a JOIN images b USING (image_id) "
        "WHERE a.run_id = 'pq' AND b.run_id = 'txt'"
    ).fetchone()
    assert same == (2,)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def test_bad_configuration_fails_fast_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], random_checkpoint: Path
) -> None:
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, "run", "--input", str(tmp_path / "nope"), "--output", out)
    assert code == 2 and err.endswith(f"input not found: {tmp_path / 'nope'}")

    manifest = tmp_path / "m.csv"
    manifest.write_text("path,x\n/a.png,1\n")
    code, err = run_cli(capsys, "run", "--manifest", str(manifest), "--output", out)
    assert code == 2 and "has no 'uri' column" in err and "--uri-column" in err

    code, err = run_cli(capsys, "run", "--manifest", str(tmp_path / "x.parquet"), "--output", out)
    assert code == 2 and "manifest not found" in err

    code, err = run_cli(
        capsys, "run", "--input", str(tmp_path), "--output", out, "--weights", "/no/such.pt"
    )
    assert code == 2 and "checkpoint not found: /no/such.pt" in err

    code, err = run_cli(
        capsys,
        "run",
        "--input",
        str(tmp_path),
        "--output",
        out,
        "--weights",
        str(random_checkpoint),
        "--weights-sha256",
        "ab" * 32,
    )
    assert code == 2 and "refusing to load it" in err

    code, err = run_cli(capsys, "run", "--input", str(tmp_path), "--output", out, "--actors", "x")
    assert code == 2 and "--actors takes N or MIN:MAX" in err

    with pytest.raises(SystemExit):
        main(["run", "--input", str(tmp_path), "--output", out, "--arch", "yolo"])
    assert "invalid choice: 'yolo'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()


def test_config_file_and_flags(tmp_path: Path) -> None:
    from segpipe.cli import build_parser, run_config

    toml = tmp_path / "job.toml"
    toml.write_text(
        'input = ["s3://bucket/a/", "s3://bucket/b/"]\noutput = "s3://bucket/out"\n'
        'weights = "none"\nmin-size = 640\nbatch_size = 8\nactors = "2:6"\n'
        'partition-by = "run_id,label"\nmax-pixels = 1000000\n'
    )
    args = build_parser().parse_args(["run", "--config", str(toml), "--batch-size", "2"])
    cfg = run_config(args)
    assert cfg.inputs == ("s3://bucket/a/", "s3://bucket/b/")
    assert cfg.model.weights == "none" and cfg.model.min_size == 640
    assert cfg.batch_size == 2  # the flag wins over the file
    assert (cfg.min_actors, cfg.max_actors) == (2, 6)
    assert cfg.partition_by == ("run_id", "label")
    assert cfg.decode.max_pixels == 1_000_000

    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("manifest: s3://bucket/m.parquet\noutput: /tmp/x\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown settings in config file: bogus"):
        run_config(build_parser().parse_args(["run", "--config", str(yaml_file)]))


def test_record_has_no_secrets_in_uris(tmp_path: Path) -> None:
    from segpipe.job.record import public_config

    cfg = RunConfig(
        output="s3://bucket/out",
        inputs=("https://user:pw@host/images/?X-Amz-Signature=abc",),
        model=ModelConfig(weights="s3://k:s@b/m.pt"),
    )
    text = json.dumps(public_config(cfg))
    for secret in ("X-Amz-Signature", "pw@", "k:s@"):
        assert secret not in text


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("s3://key:topsecret@bucket/out", "must not hold credentials"),
        ("s3://bucket/out?X-Amz-Signature=abc", "query string"),
        ("s3://bucket/a/../../other", "'..' segments"),
        ("/data/out/../../etc", "'..' segments"),
    ],
)
def test_output_uris_are_validated(output: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        RunConfig(output=output, inputs=("/data/in",))
    assert "topsecret" not in str(raised.value)


def test_listing_is_streamed_into_bounded_shards(tmp_path: Path) -> None:
    from segpipe.job.inputs import list_images, write_listing

    for i in range(25):
        (tmp_path / "imgs" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"d{i % 3}" / f"{i:03d}.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "skip.json").write_text("{}")
    uris = list(list_images([str(tmp_path / "imgs")], [".jpg"]))
    assert len(uris) == 25 and all(u.startswith("file:///") for u in uris)
    assert len(list(list_images([str(tmp_path / "imgs" / "d1" / "*.jpg")], [".jpg"]))) == 8
    count = write_listing(iter(uris), str(tmp_path / "listing"), shard_rows=10)
    shards = sorted((tmp_path / "listing").iterdir())
    assert count == 25 and [pq.read_metadata(s).num_rows for s in shards] == [10, 10, 5]
    assert np.array_equal(
        pa.concat_tables([pq.read_table(s) for s in shards]).column("uri").to_numpy(),
        np.array(uris, dtype=object),
    )


def test_local_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_checkpoint: Path
) -> None:
    from segpipe.job.runs import resolved

    monkeypatch.chdir(random_checkpoint.parent)
    cfg = resolved(
        RunConfig(
            output="out/",
            manifest="list.csv",
            model=ModelConfig(weights=random_checkpoint.name, categories="names.txt"),
        )
    )
    assert cfg.output == str(random_checkpoint.parent / "out")
    assert cfg.manifest == str(random_checkpoint.parent / "list.csv")
    assert cfg.model.weights == str(random_checkpoint)
    assert cfg.model.categories == str(random_checkpoint.parent / "names.txt")
    assert cfg.run_id is not None and cfg.run_id.startswith("run-")
    named = resolved(RunConfig(output="s3://b/o", inputs=("s3://b/i/",), run_id="x"))
    assert (named.output, named.run_id, named.model.weights) == ("s3://b/o", "x", "DEFAULT")


def test_s3_globs_and_prefixes(s3_env: str) -> None:
    from segpipe.job.inputs import InputError, list_images

    fs = fsspec.filesystem("s3")
    fs.makedirs("segpipe-glob", exist_ok=True)
    for key in ("a/1.jpg", "a/2.PNG", "a/skip.txt", "a/sub/3.jpg", "b/4.jpg"):
        fs.pipe_file(f"segpipe-glob/{key}", b"x")
    exts = [".jpg", ".png"]
    assert list(list_images(["s3://segpipe-glob/a/*"], exts)) == [
        "s3://segpipe-glob/a/1.jpg",
        "s3://segpipe-glob/a/2.PNG",
    ]
    assert list(list_images(["s3://segpipe-glob/a/"], exts)) == [
        "s3://segpipe-glob/a/1.jpg",
        "s3://segpipe-glob/a/2.PNG",
        "s3://segpipe-glob/a/sub/3.jpg",
    ]
    with pytest.raises(InputError, match="input not found: s3://segpipe-glob/c"):
        list(list_images(["s3://segpipe-glob/c"], exts))
