"""Pictures of the results: PNG overlays of a sample of images and an HTML gallery.

``render(con, run_id, to, where=..., limit=...)`` picks up to ``limit`` decoded images of the
run (those with an instance matching ``where``, a SQL predicate over ``instances`` columns,
when given), ordered by ``image_id`` (a hash of the URI: a stable sample spread over the
whole run), reads each image again from its URI, and draws its instances scoring at least
``min_score`` (or matching ``where``): the mask filled half-transparent in its class colour
and outlined, the box, and ``label score``. Coordinates are those of the decoded, upright
image, exactly as stored. ``index.html`` shows the overlays with their URIs and the run's
per-class counts. Only the sampled images are ever in memory, one at a time.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import io
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segpipe.analytics.query import iter_rows
from segpipe.core.decode import DecodedImage, decode_image
from segpipe.core.encode import decode_mask
from segpipe.io import fs_root, read_bytes, redact


@dataclass(frozen=True)
class Rendered:
    image_id: str
    uri: str
    file_name: str | None  # None: the image could not be read again
    instances: int
    problem: str | None = None


def class_colour(label: str) -> tuple[int, int, int]:
    """A stable, saturated colour per class name."""
    hue = int(hashlib.sha256(label.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay(
    pixels: np.ndarray,
    instances: Sequence[tuple[str, float, float, float, float, float, np.ndarray]],
) -> Image.Image:
    """Draw ``(label, score, x0, y0, x1, y1, mask)`` instances on an RGB image."""
    base = Image.fromarray(pixels).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    for label, _, *_, mask in instances:
        colour = class_colour(label)
        fill = np.zeros((*mask.shape, 4), dtype=np.uint8)
        fill[mask] = (*colour, 110)
        edge = mask & ~_eroded(mask)
        fill[edge] = (*colour, 255)
        layer = Image.alpha_composite(layer, Image.fromarray(fill, "RGBA"))
    image = Image.alpha_composite(base, layer).convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for label, score, x0, y0, x1, y1, _ in instances:
        colour = class_colour(label)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=2)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y0
        draw.rectangle((x0, ty, x0 + right - left + 3, ty + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, ty), text, fill=(0, 0, 0), font=font)
    return image


def render(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    to: str,
    *,
    where: str | None = None,
    limit: int = 50,
    min_score: float = 0.5,
) -> list[Rendered]:
    """Write ``<to>/<image_id>.png`` overlays and ``<to>/index.html``; returns what was drawn."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    # The instances to draw (and to pick images by, with --where), and its parameters.
    condition = f"({where})" if where else "score >= ?"
    condition_params: list[object] = [] if where else [min_score]
    picked = _pick_images(con, run_id, limit, where)
    fs, root = fs_root(to)
    fs.makedirs(root, exist_ok=True)
    drawn: list[Rendered] = []
    ids = [image_id for image_id, _ in picked]
    by_image = _instances_by_image(con, run_id, ids, condition, condition_params)
    for (image_id, uri), rows in zip(picked, by_image, strict=True):
        item, png = _draw(image_id, uri, rows)
        if png is not None:
            fs.pipe_file(f"{root}/{image_id}.png", png)
        drawn.append(item)
    counts = con.execute(
        "SELECT label, count(*) AS objects, round(avg(score), 3) FROM instances "
        f"WHERE run_id = ? AND {condition} GROUP BY label ORDER BY objects DESC, label",
        [run_id, *condition_params],
    ).fetchall()
    page = gallery_html(run_id, drawn, counts, where or f"score >= {min_score}")
    fs.pipe_file(f"{root}/index.html", page.encode("utf-8"))
    return drawn


def _pick_images(
    con: duckdb.DuckDBPyConnection, run_id: str, limit: int, where: str | None
) -> list[tuple[str, str]]:
    """``(image_id, uri)`` of the first ``limit`` decoded images of the run by image id; with
    ``where``, of those with an instance matching it."""
    with_match = (
        f"AND i.image_id IN (SELECT image_id FROM instances WHERE run_id = i.run_id AND ({where})) "
        if where
        else ""
    )
    try:
        return con.execute(
            "SELECT i.image_id, i.uri FROM images i WHERE i.run_id = ? AND i.status = 'ok' "
            + with_match
            + "ORDER BY i.image_id LIMIT ?",
            [run_id, limit],
        ).fetchall()
    except duckdb.Error as exc:
        raise ValueError(f"bad --where {where!r}: {exc}") from exc


def _instances_by_image(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    image_ids: Sequence[str],
    condition: str,
    params: Sequence[object],
) -> Iterator[list[tuple[Any, ...]]]:
    """The instances to draw of each of ``image_ids`` (in DuckDB's ``ORDER BY image_id``
    order), in that order, read by one query: each image's rows (``label, score, box_x0,
    box_y0, box_x1, box_y1, mask_rle, image_height, image_width``, by ascending score). The
    files are sorted by ``image_id`` in row groups with min/max statistics, so the ``IN``
    list lets DuckDB read only the row groups that hold these images; rows stream, one
    image's at a time."""
    if not image_ids:
        return
    marks = ", ".join("?" * len(image_ids))
    sql = (
        "SELECT image_id, label, score, box_x0, box_y0, box_x1, box_y1, mask_rle, image_height, "
        f"image_width FROM instances WHERE run_id = ? AND image_id IN ({marks}) AND {condition} "
        "ORDER BY image_id, score"
    )
    rows = iter_rows(con, sql, [run_id, *image_ids, *params])
    try:
        groups = itertools.groupby(rows, key=lambda row: str(row[0]))
        group = next(groups, None)
        for image_id in image_ids:
            found: list[tuple[Any, ...]] = []
            if group is not None and group[0] == image_id:
                found = [row[1:] for row in group[1]]
                group = next(groups, None)
            yield found
    finally:
        for _ in rows:  # the connection takes no other query before its result is read out
            pass


def _draw(
    image_id: str, uri: str, rows: Sequence[tuple[Any, ...]]
) -> tuple[Rendered, bytes | None]:
    """The overlay of the image at ``uri`` as PNG bytes, read again and drawn with ``rows``
    (``label, score, box_x0, box_y0, box_x1, box_y1, mask_rle, image_height, image_width``);
    None, and the problem in the :class:`Rendered`, where it cannot be drawn."""
    pixels = read_pixels(uri)
    if isinstance(pixels, str):
        return Rendered(image_id, uri, None, len(rows), pixels), None
    drawn = overlay_rows(pixels, rows)
    if isinstance(drawn, str):
        return Rendered(image_id, uri, None, len(rows), drawn), None
    buf = io.BytesIO()
    drawn.save(buf, format="PNG")
    return Rendered(image_id, uri, f"{image_id}.png", len(rows)), buf.getvalue()


def read_pixels(uri: str) -> np.ndarray | str:
    """The image at ``uri`` read again and decoded upright (RGB uint8 ``(H, W, 3)``, the
    coordinates the rows use), or, as a string, why it cannot be."""
    try:
        decoded = decode_image(read_bytes(uri))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not isinstance(decoded, DecodedImage):
        return decoded.message
    return decoded.pixels


def overlay_rows(pixels: np.ndarray, rows: Sequence[tuple[Any, ...]]) -> Image.Image | str:
    """:func:`overlay` of instance rows (``label, score, box_x0, box_y0, box_x1, box_y1,
    mask_rle, image_height, image_width``) on ``pixels``; or, as a string, the problem when
    the stored masks are not of the image's size (it changed since the run)."""
    instances = [
        (label, float(score), x0, y0, x1, y1, decode_mask(rle, h, w) > 0)
        for label, score, x0, y0, x1, y1, rle, h, w in rows
    ]
    if instances and instances[0][-1].shape != pixels.shape[:2]:
        return "the image changed since the run: its size differs from the stored one"
    return overlay(pixels, instances)


def gallery_html(
    run_id: str,
    drawn: Sequence[Rendered],
    counts: Sequence[tuple[str, int, float]],
    selection: str,
) -> str:
    """A self-contained page: per-class counts, then one figure per image. After loading,
    ``<body data-images-loaded data-images-total>`` say how many overlays the browser
    decoded (a check for tests and for people opening a copied folder)."""
    e = html.escape
    rows = "\n".join(_class_row(label, n, mean) for label, n, mean in counts)
    figures = "\n".join(_figure(item) for item in drawn)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>segpipe run {e(run_id)}</title>
{STYLE}</head>
<body data-images-total="{sum(d.file_name is not None for d in drawn)}">
<h1>segpipe run {e(run_id)}</h1>
<p>{len(drawn)} images; instances where <code>{e(selection)}</code>.</p>
<table><tr><th>class</th><th>objects in the run</th><th>mean score</th></tr>
{rows}
</table>
<div class="grid">
{figures}
</div>
{LOAD_CHECK_SCRIPT}
</body></html>
"""


STYLE = """<style>
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 420px; }
figure img { max-width: 420px; height: auto; display: block; }
figcaption { font-size: 0.8em; word-break: break-all; }
.missing { color: #a00; }
</style>"""

# Sets <body data-images-loaded> to the number of overlays the browser decoded.
LOAD_CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const loaded = [...document.images].filter((i) => i.complete && i.naturalWidth > 0);
  document.body.dataset.imagesLoaded = String(loaded.length);
});
</script>"""


def _class_row(label: str, objects: int, mean_score: float) -> str:
    """A row of the per-class table: the class's colour and name, its count, its mean score."""
    return (
        f'<tr><td><span class="swatch" style="background: rgb{class_colour(label)}"></span>'
        f"{html.escape(label)}</td><td>{objects}</td><td>{mean_score}</td></tr>"
    )


def _figure(item: Rendered) -> str:
    """One image's figure: its overlay, linked, or why it was not drawn; its URI (redacted)
    and its instance count."""
    e = html.escape
    caption = f"{e(redact(item.uri))}<br>{item.instances} instances"
    if item.file_name is None:
        return (
            f'<figure class="missing"><figcaption>{caption}<br>not drawn: '
            f"{e(item.problem or '')}</figcaption></figure>"
        )
    return (
        f'<figure><a href="{e(item.file_name)}"><img src="{e(item.file_name)}" '
        f'alt="{e(item.uri)}" loading="eager"></a><figcaption>{caption}</figcaption>'
        "</figure>"
    )


def _eroded(mask: np.ndarray) -> np.ndarray:
    """The mask minus its one-pixel border (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner
