"""A run at a glance: ``index.html`` with plots of its tables and its run record.

``write_report(con, run_id, to, record=...)`` writes four PNG plots and ``index.html`` beside
them into ``to`` (a folder or an object-store URI): instances per class (the
:data:`TOP_CLASSES` largest), the score distribution of the :data:`SCORE_CLASSES` largest
classes and of all, mask areas in powers-of-two buckets, and instances per decoded image
(those with none included); then a table of error codes with up to three example URIs each,
and the run record (model, weights, counts, timings, start-up timeline). A plot with nothing
to show (a run without instances) is left out and the page says why.

Every figure comes from a ``GROUP BY`` that DuckDB computes over the run's partition, so the
result is a few hundred rows whether the run holds a thousand images or ten million: no row
of the tables reaches Python. The plots are drawn by matplotlib's Agg backend through its
object-oriented API (no pyplot, no display), imported only when a report is written. The
page needs nothing but its folder: no script or font from the network.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb

from segpipe import layout
from segpipe.analytics.render import LOAD_CHECK_SCRIPT, class_colour
from segpipe.io import fs_root, redact
from segpipe.records import read_record

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TOP_CLASSES = 20  # bars in the per-class plot
SCORE_CLASSES = 8  # lines in the score plot, beside the line of all classes
SCORE_BINS = 20  # score buckets of 0.05
EXAMPLES = 3  # example URIs per error code
_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote: the page's path (or URI) and its plots' file names,
    beside it, in the page's order; and the run's counts the page shows."""

    page: str
    figures: tuple[str, ...]
    images: int
    errors: int
    instances: int
    classes: int
    has_record: bool


@dataclass(frozen=True)
class Stats:
    """The run's aggregates, each a small result of one SQL query over its partition."""

    images: int
    ok: int
    errors: int
    instances: int
    classes: list[tuple[str, int, float]]  # label, instances, mean score; largest first
    scores: dict[str | None, list[int]]  # label (None: all classes) -> SCORE_BINS counts
    areas: list[tuple[int, int]]  # (k, masks of area in [2**k, 2**(k+1))); k = -1: empty
    per_image: list[tuple[int, int]]  # (instances in an image, decoded images with that many)
    error_codes: list[tuple[str, int, list[str], str]]  # code, images, example URIs, message


@dataclass(frozen=True)
class Plot:
    """One drawn plot: its file name beside the page, heading, alt text, caption, PNG bytes."""

    file_name: str
    title: str
    alt: str
    note: str
    png: bytes


def run_record(output: str, run_id: str) -> dict[str, Any] | None:
    """The run record of ``run_id`` in ``output``, or None where there is none (or it is not
    readable JSON): a report still describes the tables."""
    try:
        return read_record(output, run_id)
    except (FileNotFoundError, ValueError):
        return None


def write_report(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    to: str,
    *,
    record: Mapping[str, Any] | None = None,
) -> Report:
    """Write the plots (PNG) and then ``<to>/index.html`` for ``run_id`` from a
    :func:`segpipe.analytics.query.connect` connection; ``record`` is the run's record
    (:func:`run_record`), None where the output has none. Reads aggregates only."""
    stats = gather(con, run_id)
    threshold = _get(record, "config", "model", "score_threshold")
    drawn = [
        _classes_plot(stats),
        _scores_plot(stats, threshold if isinstance(threshold, int | float) else None),
        _areas_plot(stats),
        _per_image_plot(stats),
    ]
    plots = [p for p in drawn if p is not None]
    fs, root = fs_root(to)
    fs.makedirs(root, exist_ok=True)
    for plot in plots:
        fs.pipe_file(f"{root}/{plot.file_name}", plot.png)
    page = report_html(run_id, stats, record, plots)
    fs.pipe_file(f"{root}/index.html", page.encode("utf-8"))
    return Report(
        page=f"{to.rstrip('/')}/index.html",
        figures=tuple(p.file_name for p in plots),
        images=stats.images,
        errors=stats.errors,
        instances=stats.instances,
        classes=len(stats.classes),
        has_record=record is not None,
    )


def gather(con: duckdb.DuckDBPyConnection, run_id: str) -> Stats:
    """The run's aggregates. Each query filters on ``run_id`` (the partition column, so
    DuckDB reads that run's files only) and returns at most a few hundred rows."""
    images, ok, errors = con.execute(
        "SELECT count(*), count(*) FILTER (status = 'ok'), count(*) FILTER (status = 'error') "
        "FROM images WHERE run_id = ?",
        [run_id],
    ).fetchall()[0]
    classes = [
        (str(label), int(n), float(mean))
        for label, n, mean in con.execute(
            "SELECT label, count(*) AS n, avg(score) FROM instances WHERE run_id = ? "
            "GROUP BY label ORDER BY n DESC, label",
            [run_id],
        ).fetchall()
    ]
    top = [label for label, _, _ in classes[:SCORE_CLASSES]]
    areas = con.execute(
        "SELECT CASE WHEN mask_area < 1 THEN -1 ELSE floor(log2(mask_area))::INTEGER END AS k, "
        "count(*) FROM instances WHERE run_id = ? GROUP BY k ORDER BY k",
        [run_id],
    ).fetchall()
    # images.num_instances is the number of rows the image has in instances (0 included):
    # one column of images, instead of a join with every instance row.
    per_image = con.execute(
        "SELECT num_instances, count(*) FROM images WHERE run_id = ? AND status = 'ok' "
        "GROUP BY num_instances ORDER BY num_instances",
        [run_id],
    ).fetchall()
    return Stats(
        images=int(images),
        ok=int(ok),
        errors=int(errors),
        instances=sum(n for _, n, _ in classes),
        classes=classes,
        scores=_score_histograms(con, run_id, top),
        areas=[(int(k), int(n)) for k, n in areas],
        per_image=[(int(k), int(n)) for k, n in per_image],
        error_codes=_error_codes(con, run_id),
    )


def _score_histograms(
    con: duckdb.DuckDBPyConnection, run_id: str, top: Sequence[str]
) -> dict[str | None, list[int]]:
    """Counts of scores in :data:`SCORE_BINS` equal buckets of 0..1 for each of the ``top``
    classes and (key None) for all classes, by one scan: the other classes are grouped as
    NULL, and the line of all classes is the sum over every group."""
    found: dict[str | None, list[int]] = {None: [0] * SCORE_BINS}
    found.update({label: [0] * SCORE_BINS for label in top})
    if not top:
        return found
    marks = ", ".join("?" * len(top))
    rows = con.execute(
        f"SELECT CASE WHEN label IN ({marks}) THEN label END AS cls, "
        f"least(floor(score * {SCORE_BINS}), {SCORE_BINS - 1})::INTEGER AS bin, count(*) "
        "FROM instances WHERE run_id = ? GROUP BY cls, bin",
        [*top, run_id],
    ).fetchall()
    for label, k, n in rows:
        k = min(max(int(k), 0), SCORE_BINS - 1)
        found[None][k] += int(n)
        if label is not None:
            found[str(label)][k] += int(n)
    return found


def _error_codes(
    con: duckdb.DuckDBPyConnection, run_id: str
) -> list[tuple[str, int, list[str], str]]:
    """Per error code, most frequent first: its images, the :data:`EXAMPLES` smallest URIs
    (aggregated top-N, no sort of all error rows) and the message of the smallest one."""
    rows = con.execute(
        f"SELECT coalesce(error_code, ''), count(*) AS n, min(uri, {EXAMPLES}), "
        "arg_min(error, uri) FROM images WHERE run_id = ? AND status = 'error' "
        "GROUP BY 1 ORDER BY n DESC, 1",
        [run_id],
    ).fetchall()
    return [(str(code), int(n), list(uris), str(message or "")) for code, n, uris, message in rows]


# -- plots -------------------------------------------------------------------------------


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of its own (Agg canvas, no pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(True, axis="y", alpha=0.3)
    return figure, axes


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _classes_plot(stats: Stats) -> Plot | None:
    """Horizontal bars: instances of the largest classes, largest on top."""
    if not stats.classes:
        return None
    shown = stats.classes[:TOP_CLASSES]
    figure, axes = _figure(8, 1.2 + 0.3 * len(shown))
    labels = [label for label, _, _ in shown][::-1]
    counts = [n for _, n, _ in shown][::-1]
    colours = [tuple(c / 255 for c in class_colour(label)) for label in labels]
    axes.barh(labels, counts, color=colours)
    axes.grid(True, axis="x", alpha=0.3)
    axes.grid(False, axis="y")
    axes.set_xlabel("instances")
    for y, n in enumerate(counts):
        axes.annotate(f"{n:,}", (n, y), xytext=(3, 0), textcoords="offset points", va="center")
    axes.margins(x=0.12)
    which = _which(len(shown), len(stats.classes))
    largest = ", ".join(f"{label} {n:,}" for label, n, _ in shown[:3])
    return Plot(
        "classes.png",
        "Instances per class",
        f"Bar chart of instances per class, {which}; largest: {largest}.",
        f"{which.capitalize()}; {stats.instances:,} instances in all.",
        _png(figure),
    )


def _which(shown: int, total: int) -> str:
    return f"the largest {shown} of {total} classes" if shown < total else f"all {total} classes"


def _scores_plot(stats: Stats, threshold: float | None) -> Plot | None:
    """Step lines: the share of each large class's instances in each score bucket, and of
    all instances (black); the run's score threshold as a dotted line."""
    total = stats.scores.get(None, [])
    if not sum(total):
        return None
    figure, axes = _figure(8, 4)
    edges = [k / SCORE_BINS for k in range(SCORE_BINS + 1)]
    for label, counts in stats.scores.items():
        if label is None or not sum(counts):
            continue
        axes.stairs([n / sum(counts) for n in counts], edges, label=label, linewidth=1.4)
    all_shares = [n / sum(total) for n in total]
    axes.stairs(all_shares, edges, label="all classes", color="black", linewidth=2.4)
    if threshold is not None:
        axes.axvline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    axes.set_xlim(0, 1)
    axes.set_xlabel(f"score (buckets of {1 / SCORE_BINS:g})")
    axes.set_ylabel("share of the class's instances")
    axes.legend(loc="upper left", fontsize="small", ncols=2)
    lines = len(stats.scores) - 1
    which = _which(lines, len(stats.classes))
    peak = max(range(SCORE_BINS), key=lambda k: total[k])
    return Plot(
        "scores.png",
        "Score distribution per class",
        f"Step lines of the score distribution of {which} and of all classes; the most "
        f"instances score {edges[peak]:.2f} to {edges[peak + 1]:.2f}.",
        f"{which.capitalize()}, each as shares of its own instances.",
        _png(figure),
    )


def _areas_plot(stats: Stats) -> Plot | None:
    """Bars over powers-of-two buckets of mask area (log axis), with COCO's small / medium /
    large limits (32² and 96² pixels) marked."""
    buckets = [(k, n) for k, n in stats.areas if k >= 0]
    empty = sum(n for k, n in stats.areas if k < 0)
    if not buckets:
        return None
    figure, axes = _figure(8, 3.6)
    axes.bar(
        [2.0**k for k, _ in buckets],
        [n for _, n in buckets],
        width=[2.0**k for k, _ in buckets],
        align="edge",
        color="#4477aa",
        edgecolor="white",
    )
    axes.set_xscale("log", base=2)
    low, high = buckets[0][0], buckets[-1][0] + 1
    ticks = [k for k in range(low - low % 2, high + 1, 2)]
    axes.set_xticks([2.0**k for k in ticks], [f"{2 ** (k // 2)}²" for k in ticks])
    for limit, name in ((32**2, "small | medium"), (96**2, "medium | large")):
        axes.axvline(limit, color="grey", linestyle=":")
        axes.annotate(
            name,
            (limit, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
            color="grey",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )
    axes.set_xlabel("mask area in pixels (side² of a square of that area)")
    axes.set_ylabel("instances")
    largest = max(buckets, key=lambda kn: kn[1])
    note = f"{empty:,} empty masks are not shown. " if empty else ""
    return Plot(
        "mask_areas.png",
        "Mask area distribution",
        f"Bar chart of mask areas in buckets that double in size; most masks cover "
        f"{2 ** largest[0]:,} to {2 ** (largest[0] + 1):,} pixels.",
        f"{note}Each bar covers areas from one power of two to the next; dotted: COCO's "
        "small, medium and large limits.",
        _png(figure),
    )


def _per_image_plot(stats: Stats) -> Plot | None:
    """Bars: how many decoded images have 0, 1, 2, ... instances."""
    from matplotlib.ticker import MaxNLocator

    if not stats.per_image:
        return None
    figure, axes = _figure(8, 3.6)
    axes.bar(
        [k for k, _ in stats.per_image], [n for _, n in stats.per_image], width=0.8, color="#228833"
    )
    axes.set_xlabel("instances in the image")
    axes.set_ylabel("decoded images")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    none = sum(n for k, n in stats.per_image if k == 0)
    most = max(k for k, _ in stats.per_image)
    median = _median(stats.per_image)
    return Plot(
        "instances_per_image.png",
        "Instances per image",
        f"Bar chart of instances per decoded image: {none:,} of {stats.ok:,} images have "
        f"none, the median is {median}, the most is {most}.",
        f"{stats.ok:,} decoded images: {none:,} with no instance, median {median}, most {most}.",
        _png(figure),
    )


def _median(histogram: Sequence[tuple[int, int]]) -> int:
    """The (lower) median of values given as (value, count), sorted by value."""
    half, seen = (sum(n for _, n in histogram) + 1) // 2, 0
    for value, n in histogram:
        seen += n
        if seen >= half:
            return value
    return 0


# -- the page ----------------------------------------------------------------------------


def report_html(
    run_id: str, stats: Stats, record: Mapping[str, Any] | None, plots: Sequence[Plot]
) -> str:
    """The page: a summary, the plots with their notes, the class table, the error codes,
    the run record and its start-up timeline. ``<body data-images-total>`` is the number of
    plots, and the load check sets ``data-images-loaded`` to those the browser decoded."""
    e = html.escape
    status = _get(record, "status")
    figures = "\n".join(
        f'<h2>{e(p.title)}</h2>\n<figure><img src="{e(p.file_name)}" alt="{e(p.alt)}" '
        f'loading="eager"><figcaption>{e(p.note)}</figcaption></figure>'
        for p in plots
    )
    absent = "" if stats.instances else "<p>No instances in this run: no plots of them.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>segpipe report: run {e(run_id)}</title>
{_STYLE}</head>
<body data-images-total="{len(plots)}">
<h1>segpipe report: run {e(run_id)}</h1>
<p>{stats.images:,} images ({stats.ok:,} ok, {stats.errors:,} error), {stats.instances:,}
instances in {len(stats.classes):,} classes{f"; status {e(str(status))}" if status else ""}.</p>
{absent}
{figures}
{_classes_table(stats)}
{_errors_table(stats)}
{_record_section(run_id, record)}
{LOAD_CHECK_SCRIPT}
</body></html>
"""


_STYLE = """<style>
body { font-family: sans-serif; margin: 1.5em; max-width: 60em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.n { text-align: right; }
figure { margin: 0 0 1em 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #444; }
.uri { word-break: break-all; font-family: monospace; font-size: 0.85em; }
.missing { color: #a00; }
</style>"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """An HTML table of already escaped cells; columns in ``numeric`` align right."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "\n".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>\n{body}\n</table>"


def _classes_table(stats: Stats) -> str:
    if not stats.classes:
        return ""
    rows = [
        (html.escape(label), f"{n:,}", f"{n / stats.instances:.1%}", f"{mean:.3f}")
        for label, n, mean in stats.classes
    ]
    table = _table(("class", "instances", "share", "mean score"), rows, {1, 2, 3})
    return f"<h2>Classes</h2>\n{table}"


def _errors_table(stats: Stats) -> str:
    if not stats.error_codes:
        return f"<h2>Errors</h2>\n<p>No errors: all {stats.images:,} images were decoded.</p>"
    e = html.escape
    rows = [
        (
            e(code or "(none)"),
            f"{n:,}",
            "<br>".join(f'<span class="uri">{e(redact(uri))}</span>' for uri in uris),
            e(_shorten(message)),
        )
        for code, n, uris, message in stats.error_codes
    ]
    table = _table(("error code", "images", "example URIs", "message of the first"), rows, {1})
    return f"<h2>Errors</h2>\n<p>{stats.errors:,} images could not be segmented.</p>\n{table}"


def _shorten(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def _record_section(run_id: str, record: Mapping[str, Any] | None) -> str:
    """The run record as a table of what it holds (older records lack some keys), and its
    start-up timeline; or a note that the output has no record of the run."""
    if record is None:
        where = html.escape(layout.record("<output>", run_id))
        return f'<h2>Run record</h2>\n<p class="missing">No run record ({where}) was found.</p>'
    rows = [(html.escape(name), html.escape(value)) for name, value in _record_rows(record)]
    section = f"<h2>Run record</h2>\n{_table(('', ''), rows, set())}"
    timeline = _get(record, "timeline")
    if isinstance(timeline, Mapping) and timeline:
        marks = sorted(timeline.items(), key=lambda kv: float(kv[1]))
        rows = [(html.escape(str(name)), f"{float(at):.2f}") for name, at in marks]
        actors = _get(record, "timeline_actors")
        told = f" ({actors} model actors reported)" if actors is not None else ""
        section += (
            f"\n<h3>Start-up timeline</h3>\n<p>Seconds since the driver process started"
            f"{html.escape(told)}.</p>\n{_table(('step', 'seconds'), rows, {1})}"
        )
    return section


# (row name, path of keys in the record, unit): what the record table shows, where present.
_RECORD_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("status", ("status",), ""),
    ("error", ("error",), ""),
    ("started", ("started_at",), ""),
    ("first started", ("first_started_at",), ""),
    ("finished", ("finished_at",), ""),
    ("attempts", ("attempts",), ""),
    ("model architecture", ("weights", "arch"), ""),
    ("architecture asked for", ("config", "model", "arch"), ""),
    ("weights", ("config", "model", "weights"), ""),
    ("weights kind", ("weights", "kind"), ""),
    ("weights name", ("weights", "name"), ""),
    ("weights SHA-256", ("weights", "sha256"), ""),
    ("input size (min, max)", ("weights", "min_size"), ""),
    ("score threshold", ("config", "model", "score_threshold"), ""),
    ("mask threshold", ("config", "model", "mask_threshold"), ""),
    ("max detections", ("config", "model", "max_detections"), ""),
    ("device", ("config", "model", "device"), ""),
    ("precision", ("config", "model", "precision"), ""),
    ("inputs", ("config", "inputs"), ""),
    ("manifest", ("config", "manifest"), ""),
    ("listed images", ("listed_images",), ""),
    ("images", ("counts", "images"), ""),
    ("ok", ("counts", "images_ok"), ""),
    ("errors", ("counts", "images_error"), ""),
    ("instances", ("counts", "instances"), ""),
    ("files", ("counts", "files"), ""),
    ("duplicate input rows", ("counts", "duplicates"), ""),
    ("seconds", ("seconds",), " s"),
    ("images/s", ("images_per_s",), ""),
    ("start-up to the first batch out of the model", ("startup_s",), " s"),
    ("steady images/s", ("steady_images_per_s",), ""),
    ("schema version", ("schema_version",), ""),
)


def _record_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, text) of each of :data:`_RECORD_ROWS` the record holds (not None or empty),
    then the library versions."""
    rows: list[tuple[str, str]] = []
    for name, path, unit in _RECORD_ROWS:
        value = _get(record, *path)
        if name.startswith("input size") and value is not None:
            value = f"{value}, {_get(record, 'weights', 'max_size')}"
        if value is None or value in ("", [], {}):
            continue
        rows.append((name, _text(value) + unit))
    versions = _get(record, "versions")
    if isinstance(versions, Mapping) and versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(redact(str(v)) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, str) and "://" in value:
        return redact(value)
    return str(value)


def _get(record: Mapping[str, Any] | None, *path: str) -> Any:
    """``record[path[0]][path[1]]...``, or None where a key (or the record) is missing."""
    value: Any = record
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value
