"""segpipe from Python: run the job, segment a Ray Dataset of your own, query an output.

    import segpipe

    summary = segpipe.run(inputs=["s3://bucket/photos/"], output="s3://bucket/seg")
    rows = segpipe.segment(ray.data.read_parquet("s3://bucket/uris.parquet"), weights="shapes")
    con = segpipe.connect("s3://bucket/seg")

Settings are the ``segpipe run`` flags' names in Python form (``score_threshold=0.7``,
``min_actors=2``), flat: each goes to :class:`~segpipe.config.RunConfig`,
:class:`~segpipe.config.ModelConfig`, :class:`~segpipe.config.DecodeConfig` or
:class:`~segpipe.config.TileConfig`, whichever declares it; a name none declares is a
``TypeError`` that lists them. Importing segpipe imports neither Ray nor torch: each
function imports what it needs when called.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from segpipe.config import DecodeConfig, ModelConfig, RunConfig, TileConfig

if TYPE_CHECKING:
    import duckdb

    from segpipe.job.pipeline import Dataset  # Ray's, through the one module that imports ray
    from segpipe.job.runs import RunSummary

# The RunConfig settings that segment() uses: how the model runs, not where rows go.
SEGMENT_SETTINGS = (
    "batch_size",
    "load_batch_size",
    "min_actors",
    "max_actors",
    "cpus_per_actor",
    "gpus_per_actor",
    "torch_threads",
)
# Neither reads nor writes anything: the settings it is built with are placeholders.
_NO_OUTPUT = "memory://segpipe-segment"


def run(cfg: RunConfig | None = None, /, **settings: Any) -> RunSummary:
    """Run the whole job (``segpipe run``) and return its summary.

    Either a :class:`RunConfig`, or its settings as keywords (``output`` and one of
    ``inputs`` / ``manifest`` are required), or both: the keywords then replace the
    config's. Errors are those of ``segpipe run``: ``ValueError`` for bad settings,
    ``segpipe.job.runs.OutputError`` for an output that refuses the run, and so on."""
    from segpipe.job.pipeline import run as run_job

    return run_job(_config(cfg, settings))


def segment(
    ds: Dataset,
    *,
    run_id: str = "segment",
    uri_column: str = "uri",
    bytes_column: str | None = None,
    table: str = "instances",
    **settings: Any,
) -> Dataset:
    """Mask R-CNN over a Ray Dataset of yours: a lazy Dataset of ``table``'s rows with the
    schema ``segpipe run`` writes (``instances``: one a detected object; ``images``: one
    an input row, failures as error rows), to filter, join and write as you like.

    ``ds`` holds image URIs in ``uri_column`` (any fsspec URI or absolute path), and
    optionally their encoded bytes in ``bytes_column`` (as ``ray.data.read_binary_files(...,
    include_paths=True)`` gives: ``uri_column="path", bytes_column="bytes"``); with bytes,
    nothing is read and the URI only names the image. Its other columns are not carried:
    join the result back on ``uri`` or ``image_id``. ``settings``: the model and decode
    settings and :data:`SEGMENT_SETTINGS`. Nothing runs until the Dataset is consumed;
    nothing is written, no run is recorded, and repeated URIs are segmented each time."""
    from segpipe.job.pipeline import segment as segment_dataset

    known = set(SEGMENT_SETTINGS).union(*(_names(kind) for kind in _NESTED.values()))
    unknown = set(settings) - known
    if unknown:
        raise TypeError(
            f"segment() takes no setting {sorted(unknown)[0]!r}; it takes the model's, the "
            f"decode's and the tiling's settings and {', '.join(SEGMENT_SETTINGS)}"
        )
    cfg = _config(None, {"output": _NO_OUTPUT, "inputs": (_NO_OUTPUT,), **settings})
    return segment_dataset(
        ds,
        replace(cfg, run_id=run_id),
        uri_column=uri_column,
        bytes_column=bytes_column,
        table=table,
    )


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the ``images`` and ``instances`` views of ``output`` and
    segpipe's SQL macros (``segpipe query``'s)."""
    from segpipe.analytics.query import connect as connect_output

    return connect_output(output)


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


# The configs nested in RunConfig whose settings are also taken by their own names.
_NESTED: dict[str, type] = {"model": ModelConfig, "decode": DecodeConfig, "tiles": TileConfig}


def _config(cfg: RunConfig | None, settings: dict[str, Any]) -> RunConfig:
    """``cfg`` (or the defaults) with ``settings`` put where their names are declared."""
    where: dict[str, dict[str, Any]] = {"run": {}, **{name: {} for name in _NESTED}}
    for name, value in settings.items():
        value = tuple(value) if isinstance(value, list) else value
        home = "run" if name in _names(RunConfig) else None
        home = home or next((n for n, kind in _NESTED.items() if name in _names(kind)), None)
        if home is None:
            raise TypeError(
                f"unknown setting {name!r}: see segpipe.config.RunConfig, ModelConfig, "
                "DecodeConfig and TileConfig (the `segpipe run` flags, in Python form)"
            )
        where[home][name] = value
    run_settings = where["run"]
    base = cfg
    if base is None:
        if "output" not in run_settings:
            raise TypeError("run() needs output= (where the tables go)")
        base = RunConfig(**run_settings)
    elif run_settings:
        base = replace(base, **run_settings)
    nested: dict[str, Any] = {}
    for name in _NESTED:
        if where[name] and name in run_settings:
            raise TypeError(f"give either {name}= or its settings, not both")
        nested[name] = replace(getattr(base, name), **where[name])
    return replace(base, **nested)
