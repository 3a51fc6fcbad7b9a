"""The ``segpipe`` command line: parses flags (and a config file) into configs, calls the library.

segpipe run --input s3://bucket/images/ --output s3://bucket/segments [options]
segpipe run --manifest s3://bucket/manifest.parquet --output s3://bucket/segments
segpipe query --output s3://bucket/segments "SELECT label, count(*) FROM instances GROUP BY 1"
segpipe demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fsspec

from segpipe.config import (
    ARCH_CHOICES,
    DEVICES,
    PRECISIONS,
    BenchConfig,
    DecodeConfig,
    ModelConfig,
    RunConfig,
)

log = logging.getLogger("segpipe")

# Flags (argparse dest names) that belong to each config dataclass.
_MODEL_KEYS = (
    "arch",
    "weights",
    "weights_sha256",
    "categories",
    "device",
    "min_size",
    "max_size",
    "score_threshold",
    "mask_threshold",
    "max_detections",
    "precision",
    "channels_last",
    "cudnn_benchmark",
)
_DECODE_KEYS = ("max_pixels",)
_RUN_KEYS = (
    "output",
    "inputs",
    "manifest",
    "uri_column",
    "extensions",
    "run_id",
    "batch_size",
    "load_batch_size",
    "gpus_per_actor",
    "cpus_per_actor",
    "torch_threads",
    "partition_by",
    "images_per_file",
    "resume",
    "overwrite",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Mask R-CNN instance segmentation over object storage, to Parquet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="segment images into Parquet tables (Ray Data job)")
    src = run.add_argument_group("input (one of)")
    src.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        action="extend",
        metavar="URI",
        help="folders, prefixes or globs on any fsspec filesystem",
    )
    src.add_argument("--manifest", metavar="URI", help="Parquet, CSV or text file of image URIs")
    src.add_argument("--uri-column", help="manifest column holding the URIs (default: uri)")
    src.add_argument("--extensions", type=_csv, help="image file extensions to list")
    run.add_argument("--output", metavar="URI", help="where the tables go (required)")
    run.add_argument("--config", metavar="FILE", help="TOML or YAML file setting these flags")
    run.add_argument("--run-id", help="name of this run (default: run-<UTC timestamp>)")
    again = run.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="finish an interrupted run of this --run-id: skip the images it committed",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace the run of this --run-id (its rows, record and listing) with a new one",
    )
    model = run.add_argument_group("model")
    model.add_argument(
        "--arch", choices=ARCH_CHOICES, help="default auto: the checkpoint's, else R50-FPN"
    )
    model.add_argument(
        "--weights", help="DEFAULT | <torchvision name> | <checkpoint URI> | shapes | none"
    )
    model.add_argument("--weights-sha256", help="required SHA-256 of the checkpoint file")
    model.add_argument("--categories", metavar="URI", help="category names for the checkpoint")
    model.add_argument("--device", choices=DEVICES)
    model.add_argument(
        "--min-size", type=int, help="short side to rescale to (default: checkpoint's, else 800)"
    )
    model.add_argument(
        "--max-size", type=int, help="long side cap (default: checkpoint's, else 1333)"
    )
    model.add_argument("--score-threshold", type=float, help="default 0.05")
    model.add_argument("--mask-threshold", type=float, help="default 0.5")
    model.add_argument("--max-detections", type=int, help="per image (default 100)")
    model.add_argument("--max-pixels", type=int, help="refuse larger images (default 50e6)")
    model.add_argument("--precision", choices=PRECISIONS, help="autocast (default fp32)")
    model.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last convolutions"
    )
    model.add_argument(
        "--cudnn-benchmark", action="store_true", default=None, help="cuDNN autotuning (CUDA)"
    )
    scale = run.add_argument_group("scale")
    scale.add_argument("--batch-size", type=int, help="images per model call (default 4)")
    scale.add_argument("--load-batch-size", type=int, help="images per decode task (default 16)")
    scale.add_argument("--actors", help="model actors: N or MIN:MAX (default: one per GPU)")
    scale.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs")
    scale.add_argument("--cpus-per-actor", type=float, help="default 1")
    scale.add_argument(
        "--torch-threads", type=int, help="torch threads per actor on CPU (default: cpus)"
    )
    scale.add_argument(
        "--partition-by", type=_csv, help="partition columns, comma-separated, or 'none'"
    )
    scale.add_argument("--images-per-file", type=int, help="images per output file (default 5000)")

    query = sub.add_parser("query", help="run SQL over an output with DuckDB")
    query.add_argument("--output", required=True, metavar="URI")
    query.add_argument("sql", help="SQL over the views `images` and `instances`")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")

    ev = sub.add_parser("eval", help="COCO box and mask AP of a run against annotations")
    ev.add_argument("--output", required=True, metavar="URI")
    ev.add_argument("--annotations", required=True, metavar="URI", help="COCO instances JSON")
    ev.add_argument("--run-id", help="the run to evaluate (default: the output's only run)")
    ev.add_argument(
        "--image-id-column",
        metavar="COL",
        help="images column holding the COCO image id (default: match by file name)",
    )

    export = sub.add_parser("export", help="a run as COCO results (and dataset) JSON")
    export.add_argument("--output", required=True, metavar="URI")
    export.add_argument("--format", choices=("coco",), default="coco")
    export.add_argument("--to", required=True, metavar="URI", help="COCO results JSON to write")
    export.add_argument("--dataset", metavar="URI", help="also write a COCO dataset JSON here")
    export.add_argument("--run-id", help="the run to export (default: the output's only run)")
    export.add_argument("--min-score", type=float, default=0.0, help="leave out weaker ones")

    ddl = sub.add_parser("ddl", help="CREATE TABLE for an output in another SQL engine")
    ddl.add_argument("--engine", required=True, choices=("athena", "trino", "bigquery", "spark"))
    ddl.add_argument("--location", required=True, metavar="URI", help="the output's URI")
    ddl.add_argument("--table", choices=("images", "instances"), help="default: both")
    ddl.add_argument("--partition-by", type=_csv, default=("run_id",), help="as in the run")

    render = sub.add_parser("render", help="PNG overlays of a sample of images + index.html")
    render.add_argument("--output", required=True, metavar="URI")
    render.add_argument("--to", required=True, metavar="DIR", help="folder (or URI) to write")
    render.add_argument("--run-id", help="the run to draw (default: the output's only run)")
    render.add_argument(
        "--where", metavar="SQL", help="predicate over instances columns, e.g. \"label = 'dog'\""
    )
    render.add_argument("--limit", type=int, default=50, help="images to draw (default 50)")
    render.add_argument(
        "--min-score", type=float, default=0.5, help="without --where: draw these (default 0.5)"
    )

    bench = sub.add_parser("bench", help="bare model vs whole pipeline vs non-model stages")
    for name, value in asdict(BenchConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            bench.add_argument(flag, action="store_true", default=value)
        else:
            bench.add_argument(flag, type=type(value), default=value)
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")

    demo = sub.add_parser("demo", help="the whole job on generated images in a local S3")
    demo.add_argument("--images", type=int, default=24, help="how many images to generate")
    return parser


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
        if args.command == "bench":
            return bench_command(args)
        if args.command == "ddl":
            from segpipe.analytics.engines import ddl

            for table in [args.table] if args.table else ["images", "instances"]:
                partition_by = () if args.partition_by == ("none",) else args.partition_by
                print(ddl(args.engine, table, args.location, partition_by))
            return 0
        from segpipe.tools.demo import run_demo

        return run_demo(args.images)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    from segpipe.job.pipeline import run

    summary = run(cfg)
    print(summary.describe())
    return 0


def run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults < config file < flags."""
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None})
    actors = values.pop("actors", None)
    known = set(_MODEL_KEYS) | set(_DECODE_KEYS) | set(_RUN_KEYS)
    unknown = sorted(set(values) - known - {"command", "verbose", "config"})
    if unknown:
        raise ValueError(f"unknown settings in config file: {', '.join(unknown)}")
    if values.get("output") is None:
        raise ValueError("--output is required")
    run_values = {k: values[k] for k in _RUN_KEYS if k in values}
    for key in ("inputs", "extensions", "partition_by"):
        if key in run_values:
            run_values[key] = _as_tuple(run_values[key])
    if run_values.get("partition_by") in (("none",), ("",)):
        run_values["partition_by"] = ()
    if actors is not None:
        run_values["min_actors"], run_values["max_actors"] = _actors(str(actors))
    return RunConfig(
        model=ModelConfig(**{k: values[k] for k in _MODEL_KEYS if k in values}),
        decode=DecodeConfig(**{k: values[k] for k in _DECODE_KEYS if k in values}),
        **run_values,
    )


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


def bench_command(args: argparse.Namespace) -> int:
    from segpipe.tools.benchmark import run_benchmark

    cfg = BenchConfig(**{k: getattr(args, k) for k in asdict(BenchConfig())})
    result = run_benchmark(cfg)
    print(result.describe())
    if args.json:
        with fsspec.open(args.json, "w") as f:
            json.dump(result.as_json(), f, indent=2)
            f.write("\n")
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return _csv(value)
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
