"""The ``segpipe`` command line: parses flags (and a config file) into configs, calls the library.

segpipe run --input s3://bucket/images/ --output s3://bucket/segments [options]
segpipe run --manifest s3://bucket/manifest.parquet --output s3://bucket/segments
segpipe query --output s3://bucket/segments "SELECT label, count(*) FROM instances GROUP BY 1"
segpipe demo

The flags of ``run`` and ``bench`` are generated from the fields of the config dataclasses
(their types, defaults and :func:`segpipe.config.flag` metadata); the other commands' flags
are written out below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec

from segpipe.config import (
    ERRORS_GROUP,
    INPUT_GROUP,
    MODEL_GROUP,
    SCALE_GROUP,
    TILE_GROUP,
    BenchConfig,
    Flag,
    RunConfig,
    comma_separated,
)
from segpipe.layout import TABLES

log = logging.getLogger("segpipe")

# The order of `segpipe run`'s flags: by group (None: the ungrouped ones), then by field.
_RUN_GROUPS = (INPUT_GROUP, None, MODEL_GROUP, TILE_GROUP, SCALE_GROUP, ERRORS_GROUP)
# Names in a run's namespace (and tolerated in its config file) that are no setting.
_NOT_SETTINGS = {"command", "verbose", "config"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Mask R-CNN instance segmentation over object storage, to Parquet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, help="what to do")
    _run_flags(
        sub.add_parser(
            "run",
            help="segment images into Parquet tables (Ray Data job)",
            epilog="exit status: 0 the run succeeded; 1 it ended failed or was stopped (short "
            "of its listing, or over --max-error-rate; its record under _runs/ says why; what "
            "it committed stays, and --resume goes on), or another driver took the run over; "
            "2 an error told in one line (bad settings, an output that cannot take the run)",
        )
    )
    _query_flags(sub.add_parser("query", help="run SQL over an output with DuckDB"))
    _eval_flags(sub.add_parser("eval", help="COCO box and mask AP of a run against annotations"))
    _export_flags(sub.add_parser("export", help="a run as COCO results (and dataset) JSON"))
    _ddl_flags(sub.add_parser("ddl", help="CREATE TABLE for an output in another SQL engine"))
    _render_flags(sub.add_parser("render", help="PNG overlays of a sample of images + index.html"))
    _report_flags(sub.add_parser("report", help="a run at a glance: plots and its record in HTML"))
    _compare_flags(sub.add_parser("compare", help="two runs of the same images, object by object"))
    _bench_flags(sub.add_parser("bench", help="bare model vs whole pipeline vs non-model stages"))
    demo = sub.add_parser("demo", help="the whole job on generated images in a local S3")
    demo.add_argument(
        "--images", type=int, default=24, help="how many images to generate (default: %(default)s)"
    )
    return parser


def _run_flags(run: argparse.ArgumentParser) -> None:
    # No argparse defaults: run_config tells a flag given from one not (a config file's
    # settings win over the dataclass defaults, flags over both).
    _add_flags(run, RunConfig, defaults=False, groups=_RUN_GROUPS)
    run.add_argument("--config", metavar="FILE", help="TOML or YAML file setting these flags")


def _bench_flags(bench: argparse.ArgumentParser) -> None:
    _add_flags(bench, BenchConfig, defaults=True, groups=(None,))
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")


def _query_flags(query: argparse.ArgumentParser) -> None:
    query.add_argument("--output", required=True, metavar="URI", help="the output to query")
    query.add_argument("sql", help="SQL over the views `images` and `instances`")
    query.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="how to print the rows (default: %(default)s)",
    )


def _eval_flags(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--output", required=True, metavar="URI", help="the output holding the run")
    ev.add_argument("--annotations", required=True, metavar="URI", help="COCO instances JSON")
    ev.add_argument("--run-id", help="the run to evaluate (default: the output's only run)")
    ev.add_argument(
        "--image-id-column",
        metavar="COL",
        help="images column holding the COCO image id (default: match by file name)",
    )


def _export_flags(export: argparse.ArgumentParser) -> None:
    export.add_argument("--output", required=True, metavar="URI", help="the output holding the run")
    export.add_argument(
        "--format", choices=("coco",), default="coco", help="the format (default: %(default)s)"
    )
    export.add_argument("--to", required=True, metavar="URI", help="COCO results JSON to write")
    export.add_argument("--dataset", metavar="URI", help="also write a COCO dataset JSON here")
    export.add_argument("--run-id", help="the run to export (default: the output's only run)")
    export.add_argument("--min-score", type=float, default=0.0, help="leave out weaker ones")


def _ddl_flags(ddl: argparse.ArgumentParser) -> None:
    ddl.add_argument(
        "--engine",
        required=True,
        choices=("athena", "trino", "bigquery", "spark"),
        help="the SQL engine to write for",
    )
    ddl.add_argument("--location", required=True, metavar="URI", help="the output's URI")
    ddl.add_argument("--table", choices=TABLES, help="default: both")
    ddl.add_argument(
        "--partition-by", type=comma_separated, default=("run_id",), help="as in the run"
    )


def _render_flags(render: argparse.ArgumentParser) -> None:
    render.add_argument("--output", required=True, metavar="URI", help="the output holding the run")
    render.add_argument("--to", required=True, metavar="DIR", help="folder (or URI) to write")
    render.add_argument("--run-id", help="the run to draw (default: the output's only run)")
    render.add_argument(
        "--where", metavar="SQL", help="predicate over instances columns, e.g. \"label = 'dog'\""
    )
    render.add_argument("--limit", type=int, default=50, help="images to draw (default 50)")
    render.add_argument(
        "--min-score", type=float, default=0.5, help="without --where: draw these (default 0.5)"
    )


def _report_flags(report: argparse.ArgumentParser) -> None:
    report.add_argument("--output", required=True, metavar="URI", help="the output holding the run")
    report.add_argument("--to", required=True, metavar="DIR", help="folder (or URI) to write")
    report.add_argument("--run-id", help="the run to describe (default: the output's only run)")


def _compare_flags(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("--output", required=True, metavar="URI", help="the output with the runs")
    compare.add_argument(
        "--run",
        action="append",
        metavar="RUN_ID",
        help="give it twice: run A (the reference), then run B",
    )
    compare.add_argument(
        "--iou", type=float, default=0.5, help="least mask IoU of a matched pair (default 0.5)"
    )
    compare.add_argument("--to", metavar="DIR", help="write comparison.json and index.html here")
    compare.add_argument("--top", type=int, default=12, help="most different images (default 12)")
    compare.add_argument(
        "--ap-images",
        type=int,
        default=5000,
        help="images the COCO AP sample holds, by image_id (default 5000; 0: no AP)",
    )


def _settings(cls: Any) -> Iterator[tuple[dataclasses.Field[Any], Flag, Any]]:
    """(field, flag, type) of each setting of a config dataclass with a flag of its own,
    those of the configs nested in it included, in field order. ``type`` is the field's
    type less ``None``: ``int`` for ``int | None``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _settings(kind)
        elif "flag" in f.metadata:
            if typing.get_origin(kind) in (types.UnionType, typing.Union):
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            yield f, f.metadata["flag"], kind
        elif "set_by" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has neither flag() nor set_by() metadata")


def _dest(f: dataclasses.Field[Any], spec: Flag) -> str:
    return spec.dest or f.name


def _add_flags(
    parser: argparse.ArgumentParser, cls: Any, *, defaults: bool, groups: tuple[str | None, ...]
) -> None:
    """A flag for each setting of ``cls``, in ``groups`` (argument groups, in this order;
    None: the parser's own). ``defaults``: the fields' defaults are the flags' defaults;
    else every flag defaults to None (store_true flags too)."""
    targets: dict[str | None, Any] = {
        title: parser.add_argument_group(title) if title else parser for title in groups
    }
    exclusive: dict[str, Any] = {}
    for f, spec, kind in sorted(_settings(cls), key=lambda s: groups.index(s[1].group)):
        target = targets[spec.group]
        if spec.exclusive:
            if spec.exclusive not in exclusive:
                exclusive[spec.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[spec.exclusive]
        kwargs: dict[str, Any] = {
            "dest": _dest(f, spec),
            "default": f.default if defaults else None,
            "help": _help(spec.help, f.default),
        }
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            # many: one value a word, each of the tuple's item type.
            parse = spec.parse or (typing.get_args(kind)[0] if spec.many else kind)
            if typing.get_origin(parse) is not None:
                raise TypeError(f"{cls.__name__}.{f.name}: flag() needs parse= for {parse}")
            if parse is not str:
                kwargs["type"] = parse
            if spec.many:
                kwargs.update(nargs="+", action="extend")
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
        target.add_argument(spec.name or f"--{f.name.replace('_', '-')}", **kwargs)


def _help(text: str, default: Any) -> str:
    """``text`` and "(default: X)", unless it has a "(default..." or X is nothing."""
    nothing = default is None or default is False or default is dataclasses.MISSING
    if not ("(default" in text or nothing or default == ()):
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "run":
            return run_command(args)
        if args.command == "query":
            return query_command(args.output, args.sql, args.format)
        if args.command == "eval":
            return eval_command(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "render":
            return render_command(args)
        if args.command == "report":
            return report_command(args)
        if args.command == "compare":
            return compare_command(args)
        if args.command == "bench":
            return bench_command(args)
        if args.command == "ddl":
            from segpipe.analytics.engines import ddl

            for table in [args.table] if args.table else TABLES:
                partition_by = () if args.partition_by == ("none",) else args.partition_by
                print(ddl(args.engine, table, args.location, partition_by))
            return 0
        from segpipe.tools.demo import run_demo

        return run_demo(args.images)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """0: the run succeeded. 1: it ran but ended failed or was stopped (short of its
    listing, or over the error budget; what it committed stays, ``--resume`` goes on).
    Refusals and bad settings are 2, in :func:`main`."""
    cfg = run_config(args)
    from segpipe.job.lease import LeaseLostError
    from segpipe.job.pipeline import run
    from segpipe.job.runs import RunFailedError

    try:
        summary = run(cfg)
    except RunFailedError as exc:
        if exc.summary is not None:
            print(exc.summary.describe(), file=sys.stderr)
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 1
    except LeaseLostError as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


def run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < config file < flags."""
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None})
    actors = values.pop("actors", None)
    settings = list(_settings(RunConfig))
    unknown = sorted(set(values) - {_dest(f, spec) for f, spec, _ in settings} - _NOT_SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings in config file: {', '.join(unknown)}")
    if values.get("output") is None:
        raise ValueError("--output is required")
    for f, spec, kind in settings:
        if _dest(f, spec) in values and typing.get_origin(kind) is tuple:
            values[_dest(f, spec)] = _as_tuple(values[_dest(f, spec)])
    if values.get("partition_by") in (("none",), ("",)):
        values["partition_by"] = ()
    # `--actors N|MIN:MAX` (a config file's `actors`) sets min_actors and max_actors.
    span = _actors(str(actors)) if actors is not None else None
    kwargs = _config_kwargs(RunConfig, values)
    if span is not None:
        kwargs["min_actors"], kwargs["max_actors"] = span
    return RunConfig(**kwargs)


def _config_kwargs(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``cls`` from ``values`` (by flag dest): the settings present in
    it, and the configs nested in ``cls`` built from it the same way."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = kind(**_config_kwargs(kind, values))  # type: ignore[operator]
        elif "flag" in f.metadata and _dest(f, f.metadata["flag"]) in values:
            kwargs[f.name] = values[_dest(f, f.metadata["flag"])]
    return kwargs


def load_config_file(uri: str) -> dict[str, Any]:
    """Settings from a TOML or YAML file; keys are flag names with '-' or '_'."""
    with fsspec.open(uri, "rb") as f:
        raw = f.read()
    if Path(uri).suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(raw) or {}
    else:
        data = tomllib.loads(raw.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"config file {uri} must hold a table of settings")
    renamed = {"input": "inputs"}
    return {renamed.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in data.items()}


def query_command(output: str, sql: str, fmt: str) -> int:
    from segpipe.analytics.query import connect

    con = connect(output)
    result = con.sql(sql)
    if result is None:
        return 0
    if fmt == "table":
        result.show(max_rows=1000, max_width=200)
    else:
        frame = result.to_arrow_table()
        if fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(frame, sys.stdout.buffer)
        else:
            for row in frame.to_pylist():
                print(json.dumps(row, default=str))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from segpipe import layout
    from segpipe.analytics.evaluation import evaluate, predictions
    from segpipe.analytics.query import connect, pick_run
    from segpipe.io import read_bytes, redact, sha256_hex
    from segpipe.job.record import now, write_json

    raw = read_bytes(args.annotations)
    try:
        gt = json.loads(raw)
        if not all(k in gt for k in ("images", "annotations", "categories")):
            raise ValueError("needs images, annotations and categories")
    except ValueError as exc:
        raise ValueError(f"{redact(args.annotations)} is not a COCO instances file: {exc}") from exc
    con = connect(args.output)
    run_id = pick_run(con, args.run_id)
    found = predictions(con, gt, run_id, args.image_id_column)
    con.close()
    metrics = evaluate(gt, found.results)
    print(
        f"run {run_id}: {found.images_matched} images matched to {len(gt['images'])} annotated "
        f"images ({found.images_unmatched} unannotated), {len(found.results)} predictions"
    )
    if found.unknown_labels:
        print(f"left out, labels not in the annotations: {found.unknown_labels}")
    for iou_type, table in metrics.tables.items():
        print(f"\n{iou_type}:\n{table}")
    target = layout.metrics(args.output, run_id)
    write_json(
        target,
        {
            "run_id": run_id,
            "annotations": redact(args.annotations),
            "annotations_sha256": sha256_hex(raw),
            "matched_by": args.image_id_column or "file_name",
            "images_matched": found.images_matched,
            "images_unmatched": found.images_unmatched,
            "annotated_images": len(gt["images"]),
            "predictions": len(found.results),
            "unknown_labels": found.unknown_labels,
            "evaluated_at": now(),
            **metrics.as_json(),
        },
    )
    print(f"\nmetrics written to {redact(target)}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from segpipe.analytics.export import export_coco
    from segpipe.analytics.query import connect, pick_run
    from segpipe.io import redact

    con = connect(args.output)
    run_id = pick_run(con, args.run_id)
    counts = export_coco(con, run_id, args.to, args.dataset, args.min_score)
    con.close()
    print(
        f"run {run_id}: {counts.results} COCO results over {counts.categories} categories "
        f"-> {redact(args.to)}"
        + (f"; {counts.images} images -> {redact(args.dataset)}" if args.dataset else "")
    )
    return 0


def render_command(args: argparse.Namespace) -> int:
    from segpipe.analytics.query import connect, pick_run
    from segpipe.analytics.render import render
    from segpipe.io import redact

    con = connect(args.output)
    run_id = pick_run(con, args.run_id)
    drawn = render(
        con, run_id, args.to, where=args.where, limit=args.limit, min_score=args.min_score
    )
    con.close()
    missing = [d for d in drawn if d.file_name is None]
    for item in missing:
        print(f"not drawn: {redact(item.uri)}: {item.problem}", file=sys.stderr)
    print(
        f"run {run_id}: {len(drawn) - len(missing)} overlays and index.html -> "
        f"{redact(args.to)}" + (f" ({len(missing)} images could not be read)" if missing else "")
    )
    return 0


def report_command(args: argparse.Namespace) -> int:
    from segpipe.analytics.query import connect, pick_run
    from segpipe.analytics.report import run_record, write_report
    from segpipe.io import redact

    con = connect(args.output)
    run_id = pick_run(con, args.run_id)
    report = write_report(con, run_id, args.to, record=run_record(args.output, run_id))
    con.close()
    print(
        f"run {run_id}: {len(report.figures)} plots and index.html -> {redact(args.to)}"
        + ("" if report.has_record else " (the output has no run record for it)")
    )
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from segpipe.analytics.compare import compare, format_comparison, write_comparison
    from segpipe.analytics.query import connect
    from segpipe.io import redact

    runs = args.run or []
    if len(runs) != 2:
        raise ValueError(f"compare takes --run exactly twice (A, then B), got {len(runs)}")
    con = connect(args.output)
    result = compare(con, runs[0], runs[1], iou=args.iou, top=args.top, ap_images=args.ap_images)
    con.close()
    print(format_comparison(result))
    if args.to:
        drawn = write_comparison(result, args.to)
        missing = [d for d in drawn if d.file_name is None]
        for item in missing:
            print(f"not drawn: {redact(item.image.uri)}: {item.problem}", file=sys.stderr)
        print(
            f"comparison.json, {len(drawn) - len(missing)} side-by-side images and index.html "
            f"-> {redact(args.to)}"
        )
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from segpipe.tools.benchmark import run_benchmark

    cfg = BenchConfig(**_config_kwargs(BenchConfig, vars(args)))
    result = run_benchmark(cfg)
    print(result.describe())
    if args.json:
        with fsspec.open(args.json, "w") as f:
            json.dump(result.as_json(), f, indent=2)
            f.write("\n")
    return 0


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return comma_separated(value)
    return tuple(str(v) for v in value)


def _actors(text: str) -> tuple[int, int | None]:
    try:
        if ":" in text:
            low, high = text.split(":", 1)
            return int(low), int(high)
        return int(text), int(text)
    except ValueError:
        raise ValueError(f"--actors takes N or MIN:MAX, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
