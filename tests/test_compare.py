"""`segpipe compare`: two runs of the shipped shapes model at score thresholds 0.3 ("low")
and 0.7 ("high") over the same images, where the differences are known.

The model runs in-process on the CPU (no Ray) and each run's detections are written with
the writer. Same model, same images: the high run's detections are exactly the low run's
scoring above 0.7 (torchvision drops boxes under the threshold before its class-wise NMS
and the mask head, and a kept box is never suppressed by a weaker one), bit for bit, which
the fixture checks. So from low to high every strong instance is kept with an unchanged
score and every weak one is lost.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segpipe.analytics.compare import (
    PANEL_GAP,
    TITLE_BAR,
    Comparison,
    compare,
    format_comparison,
    match_instances,
)
from segpipe.analytics.query import connect
from segpipe.cli import main
from segpipe.config import ModelConfig
from segpipe.core.decode import DecodedImage, decode_image
from segpipe.core.detections import Detections
from segpipe.core.model import Segmenter
from segpipe.schema import image_id
from segpipe.tools.shapes import generate, write_dataset
from tests.browser import loaded_dom
from tests.masks import detections_from_full_masks
from tests.outputs import SHAPES_LABELS, ground_truth_detections, write_output

SEED, COUNT = 9, 8  # COUNT images segmented by both runs, then three more (see `runs`)
LOW, HIGH = 0.3, 0.7


@dataclasses.dataclass(frozen=True)
class Runs:
    output: Path
    images: Path
    uris: list[str]  # the COUNT images both runs segmented
    extra: list[str]  # X, Y, Z
    low: list[Detections]
    high: list[Detections]
    relabelled: tuple[int, str, str]  # (image index, from, to) of the run "relabelled"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Runs ``low``, ``high`` and ``relabelled`` (``high`` with one label changed) in one
    output. Beyond the COUNT images: X ok in ``low`` only, Y ok in ``low`` but an error in
    ``high``, Z ok in both with no instance at all."""
    tmp = tmp_path_factory.mktemp("compare")
    images = tmp / "images"
    write_dataset(str(images), seed=SEED, count=COUNT + 3)
    shapes = list(generate(SEED, COUNT + 3))
    uris = [(images / s.file_name).as_uri() for s in shapes]
    pixels = []
    for s in shapes[:COUNT]:
        decoded = decode_image(s.png())
        assert isinstance(decoded, DecodedImage)
        pixels.append(decoded.pixels)
    found = {}
    for name, threshold in (("low", LOW), ("high", HIGH)):
        segmenter = Segmenter(
            ModelConfig(weights="shapes", device="cpu", score_threshold=threshold)
        )
        assert tuple(segmenter.categories) == SHAPES_LABELS
        found[name] = segmenter(pixels)
    for low, high in zip(found["low"], found["high"], strict=True):
        _assert_same(_strong(low), high)
    sizes = [(s.pixels.shape[1], s.pixels.shape[0]) for s in shapes]
    out = str(tmp / "out")
    x, y, z = COUNT, COUNT + 1, COUNT + 2
    extra = [(uris[k], sizes[k], ground_truth_detections(shapes[k])) for k in (x, y)]
    height, width = shapes[z].pixels.shape[:2]
    nothing = detections_from_full_masks(
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
        np.zeros((0, height, width), dtype=bool),
    )
    rows: dict[str, list[tuple[str, Any, Detections | None]]] = {
        name: [*zip(uris[:COUNT], sizes[:COUNT], dets, strict=True), (uris[z], sizes[z], nothing)]
        for name, dets in found.items()
    }
    write_output(out, "low", [*rows["low"], *extra], SHAPES_LABELS)
    write_output(out, "high", [*rows["high"], (uris[y], None, None)], SHAPES_LABELS)
    # One instance of the first image with a detection changes class.
    k = next(i for i, d in enumerate(found["high"]) if len(d))
    det = found["high"][k]
    labels = det.labels.copy()
    labels[0] = labels[0] % 3 + 1
    changed = list(found["high"])
    changed[k] = dataclasses.replace(det, labels=labels)
    relabelled = list(zip(uris[:COUNT], sizes[:COUNT], changed, strict=True))
    write_output(out, "relabelled", relabelled, SHAPES_LABELS)
    moved = (k, SHAPES_LABELS[det.labels[0]], SHAPES_LABELS[labels[0]])
    return Runs(tmp / "out", images, uris[:COUNT], uris[COUNT:], found["low"], found["high"], moved)


def _strong(det: Detections) -> Detections:
    keep = np.flatnonzero(det.scores > HIGH)
    return dataclasses.replace(
        det,
        boxes=det.boxes[keep],
        labels=det.labels[keep],
        scores=det.scores[keep],
        masks=[det.masks[int(i)] for i in keep],
        mask_origins=det.mask_origins[keep],
    )


def _assert_same(a: Detections, b: Detections) -> None:
    """Bit for bit: boxes, labels, scores, mask windows and where they lie."""
    assert len(a) == len(b)
    for name in ("boxes", "labels", "scores", "mask_origins"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks, strict=True))


def _by_class(dets: list[Detections], strong: bool | None = None) -> Counter[str]:
    """Instances per class name; ``strong``: only those above 0.7 (True) or not (False)."""
    out: Counter[str] = Counter()
    for det in dets:
        for label, score in zip(det.labels, det.scores, strict=True):
            if strong is None or (score > HIGH) == strong:
                out[SHAPES_LABELS[label]] += 1
    return out


def _expected_ap(low: list[Detections]) -> float:
    """COCO AP of the low run's strong instances against all of its instances: each class's
    results are exactly its strongest ground truths (IoU 1, scored above every miss), so
    precision is 1 up to the recall strong/all and 0 beyond; AP counts the 101 recall
    thresholds reached, averaged over the classes with ground truth."""
    thresholds = np.linspace(0.0, 1.0, 101)
    every, strong = _by_class(low), _by_class(low, strong=True)
    per_class = [
        np.sum(thresholds <= strong[c] / n) / 101 if strong[c] else 0.0 for c, n in every.items()
    ]
    return float(np.mean(per_class))


@pytest.fixture(scope="module")
def low_high(runs: Runs) -> Comparison:
    con = connect(str(runs.output))
    try:
        return compare(con, "low", "high")
    finally:
        con.close()


def test_low_against_high_keeps_the_strong_and_loses_the_weak(
    runs: Runs, low_high: Comparison
) -> None:
    c = low_high
    n_low, n_high = sum(map(len, runs.low)), sum(map(len, runs.high))
    assert n_low > n_high > 0
    t = c.totals
    assert (t.a, t.b, t.kept, t.lost, t.gained, t.relabelled) == (
        n_low,
        n_high,
        n_high,
        n_low - n_high,
        0,
        0,
    )
    assert t.score_shift == 0.0 and t.score_shift_abs == 0.0 and t.matched == n_high
    strong, weak = _by_class(runs.low, True), _by_class(runs.low, False)
    for row in c.classes:
        assert (row.kept, row.lost, row.gained) == (strong[row.label], weak[row.label], 0)
        assert row.score_shift in (0.0, None)
    assert c.relabelled == ()
    images = dataclasses.asdict(c.images)
    assert images == {
        "a": COUNT + 3,
        "b": COUNT + 2,
        "compared": COUNT + 1,  # Z too, with no instance in either run
        "only_a": 1,
        "only_b": 0,
        "error": 1,
        "size_differs": 0,
    }
    # The most different images: those that lost something, most first, then by image_id.
    weak_by_uri = {
        u: int(np.sum(d.scores <= HIGH)) for u, d in zip(runs.uris, runs.low, strict=True)
    }
    expected = sorted((-n, image_id(u)) for u, n in weak_by_uri.items() if n)
    assert [(-t.disagreement, t.image_id) for t in c.top] == expected
    assert all(t.lost == t.disagreement and t.kept == t.b for t in c.top)
    # AP of high taking low as the reference: recall strong/all per class, precision 1.
    assert c.ap is not None and c.ap_images == COUNT + 1
    for kind in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert c.ap.stats[kind][name] == pytest.approx(_expected_ap(runs.low), abs=1e-9)
    assert c.ap.stats["segm"]["AP"] < 1
    text = format_comparison(c)
    assert f"{'all':16}{n_low:>9}{n_high:>9}{n_high:>9}{n_low - n_high:>9}" in text
    assert f"on {COUNT + 1} images" in text


def test_the_ap_sample_is_the_smallest_image_ids(runs: Runs) -> None:
    con = connect(str(runs.output))
    c = compare(con, "low", "high", ap_images=5)
    con.close()
    ids = sorted(image_id(u) for u in [*runs.uris, runs.extra[2]])[:5]  # Z is compared
    sample = [d for u, d in zip(runs.uris, runs.low, strict=True) if image_id(u) in ids]
    assert c.ap is not None and c.ap_images == 5
    assert c.ap.stats["segm"]["AP"] == pytest.approx(_expected_ap(sample), abs=1e-9)


def test_high_against_low_gains_the_weak(runs: Runs) -> None:
    con = connect(str(runs.output))
    c = compare(con, "high", "low")
    con.close()
    n_low, n_high = sum(map(len, runs.low)), sum(map(len, runs.high))
    t = c.totals
    assert (t.kept, t.lost, t.gained, t.relabelled) == (n_high, 0, n_low - n_high, 0)
    assert (c.images.only_a, c.images.only_b, c.images.error) == (0, 1, 1)
    # The extra results all score below every hit: precision stays 1 up to recall 1.
    assert c.ap is not None
    assert c.ap.stats["bbox"]["AP"] == pytest.approx(1.0)
    assert c.ap.stats["segm"]["AP"] == pytest.approx(1.0)


def test_a_changed_class_is_relabelled(runs: Runs) -> None:
    con = connect(str(runs.output))
    c = compare(con, "high", "relabelled", ap_images=0)
    con.close()
    index, before, after = runs.relabelled
    n_high = sum(map(len, runs.high))
    t = c.totals
    assert (t.kept, t.lost, t.gained, t.relabelled) == (n_high - 1, 0, 0, 1)
    assert c.relabelled == ((before, after, 1),)
    rows = {r.label: r for r in c.classes}
    assert rows[before].relabelled == 1 and rows[after].relabelled_in == 1
    assert rows[before].a - rows[before].b == 1
    assert [t.image_id for t in c.top] == [image_id(runs.uris[index])]
    assert c.ap is None and "relabelled" in format_comparison(c)


def test_matching_is_greedy_by_iou_across_classes() -> None:
    """B's one square overlaps A's two: it pairs with the one it overlaps most, whatever the
    class; below the IoU threshold nothing pairs."""

    def row(label: str, x0: int, x1: int) -> tuple[Any, ...]:
        mask = np.zeros((20, 40), dtype=np.uint8, order="F")
        mask[5:15, x0:x1] = 1
        counts = mask_utils.encode(mask)["counts"].decode()
        return (label, 0.9, x0, 5, x1, 15, counts, 20, 40, int(mask.sum()))

    a = [row("circle", 0, 10), row("square", 4, 14)]
    b = [row("triangle", 3, 13)]
    assert match_instances(a, b, 0.5) == [(1, 0)]  # IoU 9/11 beats 7/13
    assert match_instances(a, b, 0.9) == []
    assert match_instances(a, [], 0.5) == [] and match_instances([], b, 0.5) == []
    # Equal IoUs: the lower index of A first.
    assert match_instances([row("circle", 0, 10), row("circle", 0, 10)], b[:1] * 2, 0.5) == [
        (0, 0),
        (1, 1),
    ]


def test_the_command_writes_json_pictures_and_a_page(
    runs: Runs, low_high: Comparison, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    to = tmp_path / "cmp"
    args = ["compare", "--output", str(runs.output), "--run", "low", "--run", "high"]
    assert main([*args, "--to", str(to), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "relabelled" in printed and "COCO AP" in printed
    figures = json.loads((to / "comparison.json").read_text())
    assert figures["totals"] == dataclasses.asdict(low_high.totals)
    assert figures["images"]["only_a"] == 1 and figures["ap_images"] == COUNT + 1
    assert [t["image_id"] for t in figures["top_images"]] == [t.image_id for t in low_high.top[:3]]
    page = (to / "index.html").read_text()
    assert 'data-images-total="3"' in page and page.count('class="pair"') == 3
    by_id = {image_id(u): u for u in runs.uris}
    for top in low_high.top[:3]:
        assert f'src="{top.image_id}.png"' in page
        source = np.asarray(Image.open(by_id[top.image_id].removeprefix("file://")))
        height, width = source.shape[:2]
        drawn = np.asarray(Image.open(to / f"{top.image_id}.png").convert("RGB"))
        assert drawn.shape == (height + TITLE_BAR, 2 * width + PANEL_GAP, 3)
        left = drawn[TITLE_BAR:, :width]
        right = drawn[TITLE_BAR:, width + PANEL_GAP :]
        assert not np.array_equal(left, right)  # A draws the instances B lost
    # An image that can't be read again is listed, not drawn.
    gone = Path(by_id[low_high.top[0].image_id].removeprefix("file://"))
    gone.rename(gone.with_suffix(".away"))
    try:
        assert main([*args, "--to", str(tmp_path / "cmp2"), "--top", "2"]) == 0
    finally:
        gone.with_suffix(".away").rename(gone)
    page = (tmp_path / "cmp2" / "index.html").read_text()
    assert page.count('class="missing"') == 1 and 'data-images-total="1"' in page


def test_bad_arguments_exit_2(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compare", "--output", str(runs.output)]
    assert main([*base, "--run", "low"]) == 2
    assert "--run exactly twice" in capsys.readouterr().err
    assert main([*base, "--run", "low", "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "high, low, relabelled" in err
    assert main([*base, "--run", "low", "--run", "low"]) == 2
    assert main([*base, "--run", "low", "--run", "high", "--iou", "0"]) == 2


def test_the_page_loads_in_chromium(runs: Runs, tmp_path: Path) -> None:
    to = tmp_path / "cmp"
    args = ["compare", "--output", str(runs.output), "--run", "low", "--run", "high"]
    assert main([*args, "--to", str(to)]) == 0
    total = int(re.search(r'data-images-total="(\d+)"', (to / "index.html").read_text()).group(1))  # type: ignore[union-attr]
    assert total > 0
    dom, stderr = loaded_dom(to / "index.html", tmp_path / "profile")
    assert f'data-images-loaded="{total}"' in dom, stderr
    assert dom.count("<img") == total
