"""Two runs over the same images, compared object by object (``segpipe compare``).

Which images: those whose ``images`` row is ``ok`` in both runs with the same width and
height are compared. The others are only counted: held by one run only, an error in either
run, or ok in both but of different sizes (the file changed between the runs).

Matching, per compared image: every instance of run A is paired with at most one of run B
and the other way round, by mask IoU computed on the stored compressed RLEs (pycocotools,
no decoding), whatever the classes. Among the pairs whose IoU is at least ``iou``, the pair
of highest IoU is taken first, then the next one whose two instances are both still free,
and so on; equal IoUs go by A's ``instance_id``, then B's. A pair of the same label is
*kept*, a pair of two labels *relabelled* (counted under A's label, and as "A label -> B
label"); an A instance left alone is *lost*, a B instance left alone *gained*. The score
shift is B's score minus A's over the pairs, by A's label. An image's disagreement is its
lost + gained + relabelled; the ``top`` images of highest disagreement are kept (ties: the
smaller ``image_id``).

COCO AP of B taking A as the reference: pycocotools' COCOeval holds everything in memory,
so it runs on a sample, the ``ap_images`` compared images of smallest ``image_id`` (a hash
of the URI, so a uniform sample that is the same for any pair of runs): A's instances are
the ground truth (``iscrowd`` 0, ``area`` the mask area), B's the results, both with their
masks and boxes; categories are the labels of both runs.

Streaming: one query returns both runs' instances of the compared images ordered by
``image_id``; rows are fetched in chunks and handled one image at a time, so memory holds
one image's rows, the per-class counters, the top images and the AP sample.
"""

from __future__ import annotations

import dataclasses
import heapq
import html
import io
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from segpipe.analytics.coco import coco_result
from segpipe.analytics.evaluation import CocoMetrics, evaluate
from segpipe.analytics.query import iter_rows, pick_run
from segpipe.analytics.render import LOAD_CHECK_SCRIPT, STYLE, overlay_rows, read_pixels
from segpipe.io import fs_root, redact
from segpipe.schema import STATUS_OK

# The side-by-side pictures: a title bar above, a gap between A (left) and B (right).
TITLE_BAR, PANEL_GAP = 16, 8
AP_COLUMNS = ("AP", "AP50", "AP75")

# One instance as the stream gives it: label, score, box_x0, box_y0, box_x1, box_y1,
# mask_rle, image_height, image_width (render's row), then mask_area.
Row = tuple[Any, ...]

# The images of each run that are ok, and those ok in both with the same size (params: A, B).
_BOTH_OK = f"""
a AS (SELECT image_id, width, height FROM images WHERE run_id = ? AND status = '{STATUS_OK}'),
b AS (SELECT image_id, width, height FROM images WHERE run_id = ? AND status = '{STATUS_OK}'),
both_ok AS (SELECT a.image_id FROM a JOIN b ON a.image_id = b.image_id
            AND a.width = b.width AND a.height = b.height)"""


@dataclass(frozen=True)
class ImageCounts:
    """How the two runs' images split: compared, or why not."""

    a: int  # images rows of run A
    b: int
    compared: int  # ok in both, same size
    only_a: int  # in A, not in B (any status)
    only_b: int
    error: int  # in both, an error in either
    size_differs: int  # ok in both, of different sizes


@dataclass(frozen=True)
class ClassRow:
    """One class's figures over the compared images (``label`` "all": the totals)."""

    label: str
    a: int  # A's instances of this class
    b: int
    kept: int  # matched, same label
    lost: int  # A's, unmatched
    gained: int  # B's, unmatched
    relabelled: int  # A's of this class matched to B's of another
    relabelled_in: int  # B's of this class matched to A's of another
    matched: int  # kept + relabelled: the pairs the score shift is over
    score_shift: float | None  # mean of B's score - A's, over the pairs
    score_shift_abs: float | None  # mean of |B's score - A's|


@dataclass(frozen=True)
class TopImage:
    """An image where the runs disagree, with both runs' instance rows (to draw it)."""

    image_id: str
    uri: str
    a: int
    b: int
    kept: int
    lost: int
    gained: int
    relabelled: int
    rows_a: tuple[Row, ...] = field(repr=False, compare=False)
    rows_b: tuple[Row, ...] = field(repr=False, compare=False)

    @property
    def disagreement(self) -> int:
        return self.lost + self.gained + self.relabelled


@dataclass(frozen=True)
class Comparison:
    run_a: str
    run_b: str
    iou: float
    images: ImageCounts
    classes: tuple[ClassRow, ...]
    totals: ClassRow
    relabelled: tuple[tuple[str, str, int], ...]  # (A's label, B's label, count)
    ap: CocoMetrics | None  # None: no image in the sample
    ap_images: int  # the compared images the AP sample holds
    top: tuple[TopImage, ...]

    def as_json(self) -> dict[str, Any]:
        def top(t: TopImage) -> dict[str, Any]:
            keys = ("image_id", "uri", "a", "b", "kept", "lost", "gained", "relabelled")
            return {k: getattr(t, k) for k in keys} | {"uri": redact(t.uri)}

        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "iou": self.iou,
            "images": dataclasses.asdict(self.images),
            "classes": [dataclasses.asdict(c) for c in self.classes],
            "totals": dataclasses.asdict(self.totals),
            "relabelled": [{"from": f, "to": t, "count": n} for f, t, n in self.relabelled],
            "ap": None if self.ap is None else self.ap.stats,
            "ap_images": self.ap_images,
            "top_images": [top(t) for t in self.top],
        }


def match_instances(a: Sequence[Row], b: Sequence[Row], iou: float) -> list[tuple[int, int]]:
    """One-to-one pairs ``(index in a, index in b)`` of one image's instances by mask IoU,
    across classes: among the pairs with IoU >= ``iou``, greedily by descending IoU (ties:
    ascending index in ``a``, then in ``b``), skipping a pair whose instances are taken."""
    if not a or not b:
        return []
    rles_a = [{"size": [r[7], r[8]], "counts": r[6]} for r in a]
    rles_b = [{"size": [r[7], r[8]], "counts": r[6]} for r in b]
    ious = np.asarray(mask_utils.iou(rles_b, rles_a, [0] * len(a)), dtype=float)
    ious = ious.reshape(len(b), len(a))
    bj, ai = np.nonzero(ious >= iou)
    pairs: list[tuple[int, int]] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for k in np.lexsort((bj, ai, -ious[bj, ai])):
        i, j = int(ai[k]), int(bj[k])
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return pairs


class _Tally:
    """Running per-class counters, score-shift sums and the top images."""

    def __init__(self, top: int) -> None:
        self.a: Counter[str] = Counter()
        self.b: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.gained: Counter[str] = Counter()
        self.relabelled: Counter[tuple[str, str]] = Counter()
        self.shift_sum: defaultdict[str, float] = defaultdict(float)
        self.shift_abs: defaultdict[str, float] = defaultdict(float)
        self.top = top
        self.heap: list[tuple[int, int, TopImage]] = []
        self.seen = 0

    def add(self, image_id: str, uri: str, a: list[Row], b: list[Row], iou: float) -> None:
        """Match one image's instances and count what became of them."""
        pairs = match_instances(a, b, iou)
        self.a.update(r[0] for r in a)
        self.b.update(r[0] for r in b)
        kept = relabelled = 0
        for i, j in pairs:
            from_label, to_label = a[i][0], b[j][0]
            if from_label == to_label:
                self.kept[from_label] += 1
                kept += 1
            else:
                self.relabelled[from_label, to_label] += 1
                relabelled += 1
            shift = float(b[j][1]) - float(a[i][1])
            self.shift_sum[from_label] += shift
            self.shift_abs[from_label] += abs(shift)
        matched_a, matched_b = {i for i, _ in pairs}, {j for _, j in pairs}
        self.lost.update(r[0] for i, r in enumerate(a) if i not in matched_a)
        self.gained.update(r[0] for j, r in enumerate(b) if j not in matched_b)
        lost, gained = len(a) - len(pairs), len(b) - len(pairs)
        if lost + gained + relabelled and self.top:
            item = TopImage(
                image_id, uri, len(a), len(b), kept, lost, gained, relabelled, tuple(a), tuple(b)
            )
            self.seen += 1  # images come by ascending image_id: an earlier one wins a tie
            entry = (item.disagreement, -self.seen, item)
            if len(self.heap) < self.top:
                heapq.heappush(self.heap, entry)
            else:
                heapq.heappushpop(self.heap, entry)

    def rows(self) -> tuple[tuple[ClassRow, ...], ClassRow]:
        """The per-class rows (most instances first) and the totals."""
        labels = sorted(set(self.a) | set(self.b), key=lambda x: (-self.a[x] - self.b[x], x))
        out_of = Counter[str]()
        into = Counter[str]()
        for (f, t), n in self.relabelled.items():
            out_of[f] += n
            into[t] += n
        rows = [self._row(x, out_of[x], into[x]) for x in labels]
        moved = sum(out_of.values())
        kept = sum(r.kept for r in rows)
        shift, shift_abs = _means(
            sum(self.shift_sum.values()), sum(self.shift_abs.values()), kept + moved
        )
        totals = ClassRow(
            label="all",
            a=sum(r.a for r in rows),
            b=sum(r.b for r in rows),
            kept=kept,
            lost=sum(r.lost for r in rows),
            gained=sum(r.gained for r in rows),
            relabelled=moved,
            relabelled_in=moved,
            matched=kept + moved,
            score_shift=shift,
            score_shift_abs=shift_abs,
        )
        return tuple(rows), totals

    def _row(self, label: str, out_of: int, into: int) -> ClassRow:
        matched = self.kept[label] + out_of
        shift, shift_abs = _means(self.shift_sum[label], self.shift_abs[label], matched)
        return ClassRow(
            label=label,
            a=self.a[label],
            b=self.b[label],
            kept=self.kept[label],
            lost=self.lost[label],
            gained=self.gained[label],
            relabelled=out_of,
            relabelled_in=into,
            matched=matched,
            score_shift=shift,
            score_shift_abs=shift_abs,
        )


def _means(total: float, total_abs: float, n: int) -> tuple[float | None, float | None]:
    return (total / n, total_abs / n) if n else (None, None)


class _ApSample:
    """The sampled images' instances: A's as COCO ground truth, B's as COCO results."""

    def __init__(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.a: list[tuple[int, Row]] = []  # (COCO image id, row)
        self.b: list[tuple[int, Row]] = []

    def add(self, image_id: str, a: list[Row], b: list[Row]) -> None:
        coco_id = len(self.images) + 1
        height, width = (a or b)[0][7:9]
        self.images.append({"id": coco_id, "file_name": image_id, "height": height, "width": width})
        self.a.extend((coco_id, r) for r in a)
        self.b.extend((coco_id, r) for r in b)

    def evaluate(self, labels: Sequence[str]) -> CocoMetrics | None:
        """bbox and segm AP of the results against the ground truth, categories = ``labels``."""
        if not self.images:
            return None
        ids = {label: k for k, label in enumerate(sorted(labels), 1)}
        annotations = [
            {
                "id": n,
                "image_id": coco_id,
                "category_id": ids[label],
                "iscrowd": 0,
                "area": float(area),
                "bbox": [float(x0), float(y0), float(x1) - float(x0), float(y1) - float(y0)],
                "segmentation": {"size": [int(h), int(w)], "counts": rle},
            }
            for n, (coco_id, (label, _, x0, y0, x1, y1, rle, h, w, area)) in enumerate(self.a, 1)
        ]
        results = [
            coco_result(coco_id, ids[label], (x0, y0, x1, y1), score, (h, w), rle)
            for coco_id, (label, score, x0, y0, x1, y1, rle, h, w, _) in self.b
        ]
        gt = {
            "images": self.images,
            "annotations": annotations,
            "categories": [{"id": k, "name": label} for label, k in ids.items()],
        }
        return evaluate(gt, results)


def compare(
    con: duckdb.DuckDBPyConnection,
    run_a: str,
    run_b: str,
    *,
    iou: float = 0.5,
    top: int = 12,
    ap_images: int = 5000,
) -> Comparison:
    """Compare run B against run A of the output behind ``con`` (see the module docstring):
    ``iou`` in (0, 1] the least mask IoU of a pair, ``top`` the images kept as the most
    different, ``ap_images`` the size of the AP sample (0: no AP)."""
    _check(con, run_a, run_b, iou, top, ap_images)
    images = _image_counts(con, run_a, run_b)
    cutoff = _ap_cutoff(con, run_a, run_b, ap_images)
    tally, sample = _Tally(top), _ApSample()
    for image_id, uri, a, b in _images(con, run_a, run_b):
        tally.add(image_id, uri, a, b, iou)
        if cutoff is not None and image_id <= cutoff:
            sample.add(image_id, a, b)
    classes, totals = tally.rows()
    ap = sample.evaluate([c.label for c in classes]) if ap_images else None
    relabelled = tuple((f, t, n) for (f, t), n in sorted(tally.relabelled.items()))
    top_images = tuple(e[2] for e in sorted(tally.heap, key=lambda e: (-e[0], e[2].image_id)))
    return Comparison(
        run_a,
        run_b,
        iou,
        images,
        classes,
        totals,
        relabelled,
        ap,
        min(ap_images, images.compared),
        top_images,
    )


def _check(
    con: duckdb.DuckDBPyConnection, run_a: str, run_b: str, iou: float, top: int, ap_images: int
) -> None:
    """ValueErrors for runs the output does not hold, one run twice, and bad numbers."""
    for run in (run_a, run_b):
        pick_run(con, run)
    if run_a == run_b:
        raise ValueError(f"compare needs two different runs, got {run_a!r} twice")
    if not 0 < iou <= 1:
        raise ValueError(f"--iou must be in (0, 1], got {iou}")
    if top < 0 or ap_images < 0:
        raise ValueError(f"--top and --ap-images must be >= 0, got {top} and {ap_images}")


def _image_counts(con: duckdb.DuckDBPyConnection, run_a: str, run_b: str) -> ImageCounts:
    """The images of both runs, counted by what becomes of them (one aggregate query)."""
    both = "a.image_id IS NOT NULL AND b.image_id IS NOT NULL"
    ok = f"a.status = '{STATUS_OK}' AND b.status = '{STATUS_OK}'"
    same = "a.width = b.width AND a.height = b.height"
    row = con.execute(
        "WITH a AS (SELECT image_id, status, width, height FROM images WHERE run_id = ?), "
        "b AS (SELECT image_id, status, width, height FROM images WHERE run_id = ?) "
        "SELECT count(a.image_id), count(b.image_id), "
        f"count(*) FILTER (WHERE {both} AND {ok} AND {same}), "
        "count(*) FILTER (WHERE b.image_id IS NULL), count(*) FILTER (WHERE a.image_id IS NULL), "
        f"count(*) FILTER (WHERE {both} AND NOT ({ok})), "
        f"count(*) FILTER (WHERE {both} AND {ok} AND NOT ({same})) "
        "FROM a FULL OUTER JOIN b ON a.image_id = b.image_id",
        [run_a, run_b],
    ).fetchone()
    assert row is not None
    return ImageCounts(*(int(v) for v in row))


def _ap_cutoff(
    con: duckdb.DuckDBPyConnection, run_a: str, run_b: str, ap_images: int
) -> str | None:
    """The ``ap_images``-th smallest compared image id (the AP sample is those up to it);
    the largest when fewer are compared; None for no sample."""
    if ap_images == 0:
        return None
    row = con.execute(
        f"WITH {_BOTH_OK} SELECT max(image_id) FROM "
        "(SELECT image_id FROM both_ok ORDER BY image_id LIMIT ?)",
        [run_a, run_b, ap_images],
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _images(
    con: duckdb.DuckDBPyConnection, run_a: str, run_b: str
) -> Iterator[tuple[str, str, list[Row], list[Row]]]:
    """``(image_id, uri, A's rows, B's rows)`` of each compared image holding an instance in
    either run, by ascending image id; rows by ``instance_id``. One streamed query."""
    sql = (
        f"WITH {_BOTH_OK} SELECT i.image_id, i.run_id = ? AS in_b, i.uri, i.label, i.score, "
        "i.box_x0, i.box_y0, i.box_x1, i.box_y1, i.mask_rle, i.image_height, i.image_width, "
        "i.mask_area FROM instances i WHERE i.run_id IN (?, ?) "
        "AND i.image_id IN (SELECT image_id FROM both_ok) "
        "ORDER BY i.image_id, in_b, i.instance_id"
    )
    rows = iter_rows(con, sql, [run_a, run_b, run_b, run_a, run_b])
    for image_id, group in itertools.groupby(rows, key=lambda r: r[0]):
        a: list[Row] = []
        b: list[Row] = []
        uri = ""
        for row in group:
            uri = row[2]
            (b if row[1] else a).append(row[3:])
        yield str(image_id), str(uri), a, b


def format_comparison(c: Comparison) -> str:
    """A summary for the terminal: image counts, the per-class table, relabellings, AP."""
    i = c.images
    lines = [
        f"A = {c.run_a} ({i.a} images), B = {c.run_b} ({i.b} images); instances matched by "
        f"mask IoU >= {c.iou:g} across classes",
        f"images: {i.compared} compared (ok in both); not compared: {i.only_a} only in A, "
        f"{i.only_b} only in B, {i.error} an error in either, {i.size_differs} of another size",
        "",
        f"{'class':16}{'A':>9}{'B':>9}{'kept':>9}{'lost':>9}{'gained':>9}{'relabelled':>12}"
        f"{'score shift':>13}",
    ]
    for row in (*c.classes, c.totals):
        shift = "" if row.score_shift is None else f"{row.score_shift:+.4f}"
        lines.append(
            f"{row.label[:16]:16}{row.a:>9}{row.b:>9}{row.kept:>9}{row.lost:>9}{row.gained:>9}"
            f"{row.relabelled:>12}{shift:>13}"
        )
    lines.append("(relabelled: by A's label; score shift: mean of B - A over matched instances)")
    for f, t, n in c.relabelled:
        lines.append(f"relabelled {f} -> {t}: {n}")
    lines.append("")
    if c.ap is None:
        lines.append("COCO AP of B with A as reference: not computed (no instance sampled)")
    else:
        lines.append(f"COCO AP of B with A as reference, on {c.ap_images} images:")
        lines.append(f"{'':6}" + "".join(f"{k:>8}" for k in AP_COLUMNS))
        for kind, stats in c.ap.stats.items():
            lines.append(f"{kind:6}" + "".join(f"{stats[k]:>8.3f}" for k in AP_COLUMNS))
    if c.top:
        worst = ", ".join(f"{redact(t.uri)} ({t.disagreement})" for t in c.top[:3])
        lines.append(f"most different images: {worst}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Drawn:
    image: TopImage
    file_name: str | None  # None: not drawn
    problem: str | None = None


def write_comparison(c: Comparison, to: str) -> list[Drawn]:
    """``<to>/comparison.json``, ``<to>/<image_id>.png`` for each top image (A's overlay
    left, B's right) and ``<to>/index.html``; ``to`` is a folder or an fsspec URI."""
    fs, root = fs_root(to)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/comparison.json", json.dumps(c.as_json(), indent=2).encode() + b"\n")
    drawn = []
    for item in c.top:
        png = side_by_side(item, c.run_a, c.run_b)
        if isinstance(png, str):
            drawn.append(Drawn(item, None, png))
            continue
        fs.pipe_file(f"{root}/{item.image_id}.png", png)
        drawn.append(Drawn(item, f"{item.image_id}.png"))
    fs.pipe_file(f"{root}/index.html", comparison_html(c, drawn).encode("utf-8"))
    return drawn


def side_by_side(item: TopImage, run_a: str, run_b: str) -> bytes | str:
    """PNG bytes of the image read again from its URI: A's instances drawn on the left, B's
    on the right, ``PANEL_GAP`` pixels apart, under a ``TITLE_BAR`` naming the runs; the
    picture is ``2 * width + PANEL_GAP`` by ``height + TITLE_BAR``. Or why it can't be drawn."""
    pixels = read_pixels(item.uri)
    if isinstance(pixels, str):
        return pixels
    panels = []
    for rows in (item.rows_a, item.rows_b):
        drawn = overlay_rows(pixels, sorted((r[:9] for r in rows), key=lambda r: r[1]))
        if isinstance(drawn, str):
            return drawn
        panels.append(drawn)
    height, width = pixels.shape[:2]
    canvas = Image.new("RGB", (2 * width + PANEL_GAP, height + TITLE_BAR), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    titles = (f"A {run_a}: {item.a} objects", f"B {run_b}: {item.b} objects")
    for k, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = k * (width + PANEL_GAP)
        canvas.paste(panel, (x, TITLE_BAR))
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def comparison_html(c: Comparison, drawn: Sequence[Drawn]) -> str:
    """A self-contained page: the counts, the per-class table, the AP, then the most
    different images side by side. ``<body data-images-total>`` and the load check are
    render's (:data:`segpipe.analytics.render.LOAD_CHECK_SCRIPT`)."""
    e = html.escape
    head = ("class", "A", "B", "kept", "lost", "gained", "relabelled", "score shift")
    rows = "\n".join(_class_row(r) for r in (*c.classes, c.totals))
    ap = "" if c.ap is None else _ap_table(c.ap.stats, c.ap_images)
    figures = "\n".join(_figure(d) for d in drawn)
    summary = e(format_comparison(c).split("\n\n", 1)[0])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>segpipe compare {e(c.run_a)} / {e(c.run_b)}</title>
{STYLE}
<style>figure.pair, figure.pair img {{ max-width: 860px; }}</style></head>
<body data-images-total="{sum(d.file_name is not None for d in drawn)}">
<h1>segpipe compare: A {e(c.run_a)}, B {e(c.run_b)}</h1>
<pre>{summary}</pre>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{rows}
</table>
{ap}
<h2>Most different images (lost + gained + relabelled)</h2>
<div class="grid">
{figures}
</div>
{LOAD_CHECK_SCRIPT}
</body></html>
"""


def _class_row(r: ClassRow) -> str:
    shift = "" if r.score_shift is None else f"{r.score_shift:+.4f}"
    cells = (r.label, r.a, r.b, r.kept, r.lost, r.gained, r.relabelled, shift)
    return "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>"


def _ap_table(stats: Mapping[str, Mapping[str, float]], images: int) -> str:
    rows = "\n".join(
        f"<tr><td>{kind}</td>" + "".join(f"<td>{s[k]:.3f}</td>" for k in AP_COLUMNS) + "</tr>"
        for kind, s in stats.items()
    )
    head = "".join(f"<th>{k}</th>" for k in AP_COLUMNS)
    return (
        f"<p>COCO AP of B with A as the reference, on {images} images:</p>\n"
        f"<table><tr><th></th>{head}</tr>\n{rows}\n</table>"
    )


def _figure(d: Drawn) -> str:
    e, t = html.escape, d.image
    caption = (
        f"{e(redact(t.uri))}<br>A {t.a}, B {t.b}: kept {t.kept}, lost {t.lost}, "
        f"gained {t.gained}, relabelled {t.relabelled}"
    )
    if d.file_name is None:
        return (
            f'<figure class="missing"><figcaption>{caption}<br>not drawn: '
            f"{e(d.problem or '')}</figcaption></figure>"
        )
    return (
        f'<figure class="pair"><a href="{e(d.file_name)}"><img src="{e(d.file_name)}" '
        f'alt="{e(redact(t.uri))}" loading="eager"></a><figcaption>{caption}</figcaption>'
        "</figure>"
    )
