"""Inputs at scale, through the real job on the embedded Ray (``ray_local``): a manifest's
extra columns keep their own Arrow types in every ``images`` file, and an image named twice
(a manifest that repeats it, overlapping ``--input`` prefixes) gets one ``images`` row, the
copies counted as duplicates."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from segpipe import layout
from segpipe.config import ModelConfig, RunConfig
from segpipe.job.commit import units
from segpipe.job.inputs import (
    COPIES_COLUMN,
    EXTRAS_COLUMN,
    csv_convert_options,
    extras_schema,
    manifest_schema,
)
from segpipe.job.pipeline import run
from segpipe.job.runs import RunSummary
from segpipe.schema import image_id
from segpipe.tools.samples import sample_image

N = 12
T = "2024-03-01T12:00:00"


def images(folder: Path, n: int, first_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"im{first_seed + i:02d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        sample_image(first_seed + i, (40 + 4 * i, 32)).save(path)
    return paths


def job(output: Path, run_id: str, **kwargs: object) -> RunSummary:
    """The real job with the shipped tiny model, several small batches and files."""
    model = ModelConfig(weights="shapes", device="cpu", min_size=64, max_size=96)
    cfg = RunConfig(
        output=str(output),
        run_id=run_id,
        model=model,
        batch_size=2,
        load_batch_size=4,
        images_per_file=5,
        **kwargs,  # type: ignore[arg-type]
    )
    return run(cfg)


def images_files(output: Path, run_id: str) -> list[pa.Table]:
    """Each images file of the run, as written (partitioned by run_id)."""
    folder = output / "images" / f"run_id={run_id}"
    return [pq.read_table(p) for p in sorted(folder.rglob("*.parquet"))]


def by_uri(table: pa.Table, columns: list[str]) -> list[dict[str, object]]:
    return table.sort_by("uri").select(["uri", *columns]).to_pylist()


def test_manifest_columns_keep_their_types(ray_local: None, tmp_path: Path) -> None:
    """Nullable ints, time-zoned timestamps, strings with nulls, columns null throughout
    whole batches: every images file holds the manifest's types, nulls as nulls."""
    paths = images(tmp_path / "in", N)
    manifest = pa.table(
        {
            "path": [str(p) for p in paths],
            "n": pa.array([None if i % 3 == 0 else 2**60 + i for i in range(N)], pa.int64()),
            "taken": pa.array(
                [
                    None if i % 4 == 1 else dt.datetime(2024, 3, 1, 12, i, tzinfo=dt.UTC)
                    for i in range(N)
                ],
                pa.timestamp("us", tz="Europe/Paris"),
            ),
            "note": pa.array([None if i % 2 else f"note {i}" for i in range(N)]),
            # Null in all rows but one (so in whole batches), and in every row.
            "late": pa.array([None if i != 7 else 1.75 for i in range(N)], pa.float32()),
            "never": pa.array([None] * N, pa.int32()),
            "ok": pa.array([None if i % 5 == 0 else i % 2 == 0 for i in range(N)]),
        }
    )
    pq.write_table(manifest, tmp_path / "m.parquet")
    output = tmp_path / "out"
    summary = job(output, "types", manifest=str(tmp_path / "m.parquet"), uri_column="path")
    assert (summary.images, summary.duplicates) == (N, 0)

    extras = manifest.drop_columns(["path"])
    files = images_files(output, "types")
    assert len(files) >= 2  # several units, each from several batches
    for table in files:
        assert table.schema.names[-len(extras.schema) :] == extras.schema.names
        for field in extras.schema:
            assert table.schema.field(field.name).type == field.type, field.name
    got = pa.concat_tables(files)
    assert got.num_rows == N
    for name in extras.column_names:
        assert got.column(name).null_count == extras.column(name).null_count, name
    expected = manifest.append_column("uri", pa.array([p.as_uri() for p in paths]))
    assert by_uri(got, extras.column_names) == by_uri(expected, extras.column_names)


def test_csv_types_come_from_the_start_of_the_file(tmp_path: Path) -> None:
    """A column empty in the first block is read as text; read with the pinned types, every
    block has the same schema (unpinned, pyarrow's streaming reader fails on a later one)."""
    manifest = tmp_path / "m.csv"
    rows = 40_000  # more than the 1 MiB that the types are inferred from
    with manifest.open("w") as f:
        f.write("uri,count,later\n")
        for i in range(rows):
            later = "x" if i > 30_000 else ""
            f.write(f"s3://bucket/some/longer/prefix/image-{i:08d}.jpg,{i},{later}\n")
    schema = manifest_schema(str(manifest))
    assert schema is not None
    assert schema.field("count").type == pa.int64()
    assert schema.field("later").type == pa.string()
    assert extras_schema(schema, "uri").names == ["count", "later"]
    # Read block by block, as Ray Data's read_csv does: unpinned, the later block fails.
    with pytest.raises(pa.ArrowInvalid, match="conversion error to null"):
        list(pacsv.open_csv(manifest))
    pinned = list(pacsv.open_csv(manifest, convert_options=csv_convert_options(schema, "uri")))
    assert len(pinned) > 1 and all(b.schema == schema for b in pinned)
    assert sum(b.num_rows for b in pinned) == rows


def test_duplicates_are_dropped_and_counted(ray_local: None, tmp_path: Path) -> None:
    """Overlapping --input prefixes, and a manifest that names images twice (as a path and
    as its file:// URI, with different extra values): one images row per image, the other
    copies counted, in the summary and in the commit markers, which a resume sums."""
    top = images(tmp_path / "in", 3)
    nested = images(tmp_path / "in" / "sub", 5, first_seed=3)
    output = tmp_path / "out"
    summary = job(output, "prefixes", inputs=(str(tmp_path / "in"), str(tmp_path / "in" / "sub")))
    assert (summary.images, summary.duplicates) == (8, 5)
    assert sum(u.counts.duplicates for u in units(str(output), "prefixes")) == 5
    assert sum(u.counts.images for u in units(str(output), "prefixes")) == 8

    # A CSV manifest, whose columns are also typed once, from the start of the file: an int
    # column with empty cells (images 0 and 4, named once each) and a time-zoned timestamp.
    rows: list[tuple[object, ...]] = [("uri", "camera", "n", "taken")]
    for i, p in enumerate([*top, *nested]):
        rows.append((str(p), f"cam-{i}", "" if i in (0, 4) else 10**15 + i, f"{T}+01:00"))
    # Copies: the same file as a file:// URI, as the same path with spaces around it (and
    # another camera), and the same row again.
    rows += [(nested[0].as_uri(), "cam-z", *rows[4][2:]), (f"  {top[1]}  ", "cam-a", *rows[2][2:])]
    rows.append(rows[3])
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    summary = job(output, "repeats", manifest=str(manifest))
    assert (summary.images, summary.duplicates) == (8, 3)

    inferred = pacsv.read_csv(manifest)
    assert inferred.schema.field("n").type == pa.int64()
    assert inferred.schema.field("taken").type == pa.timestamp("s", tz="UTC")
    # The images files hold those types as Parquet holds them (it has no seconds:
    # timestamp[s] is kept as milliseconds, as for any table written with pyarrow).
    pq.write_table(inferred, tmp_path / "inferred.parquet")
    expected = pq.read_schema(tmp_path / "inferred.parquet")
    files = images_files(output, "repeats")
    for table in files:
        for name in ("camera", "n", "taken"):
            assert table.schema.field(name).type == expected.field(name).type, name
    got = pa.concat_tables(files)
    assert got.num_rows == len(set(got.column("image_id").to_pylist())) == 8
    assert got.column("n").null_count == 2 and got.column("taken").null_count == 0
    assert EXTRAS_COLUMN not in got.column_names and COPIES_COLUMN not in got.column_names
    camera = dict(zip(got.column("uri").to_pylist(), got.column("camera").to_pylist(), strict=True))
    # The copy kept: the first by the URI as written (stripped), then by the packed extra
    # values (here they differ only in one character of the camera).
    assert camera[nested[0].as_uri()] == "cam-3"  # "/tmp/..." sorts before "file:///tmp/..."
    assert camera[top[1].as_uri()] == "cam-1"  # the same URI: "cam-1" before "cam-a"
    assert camera[top[2].as_uri()] == "cam-2"

    # A resume after losing the unit that held a duplicated image: the skipped images keep
    # the duplicates their units counted, the redone ones count theirs again.
    lost = image_id(nested[0].as_uri())
    (unit,) = [
        u
        for u in units(str(output), "repeats")
        if lost in pq.read_table(output / u.files["images"][0]).column("image_id").to_pylist()
    ]
    for rel in (r for files in unit.files.values() for r in files):
        (output / rel).unlink()
    Path(layout.marker(str(output), "repeats", unit.stem)).unlink()
    summary = job(output, "repeats", manifest=str(manifest), resume=True)
    assert (summary.images, summary.duplicates) == (8, 3)
    assert summary.resumed == 8 - unit.counts.images
    got = pa.concat_tables(images_files(output, "repeats"))
    assert got.num_rows == len(set(got.column("image_id").to_pylist())) == 8
    again = dict(zip(got.column("uri").to_pylist(), got.column("camera").to_pylist(), strict=True))
    assert again == camera  # the redone images kept the same copies
