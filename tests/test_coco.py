"""`segpipe eval` and `segpipe export --format coco` against exact ground truth."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segpipe import layout
from segpipe.analytics.evaluation import STAT_NAMES
from segpipe.cli import main
from segpipe.tools.shapes import generate, write_dataset
from tests.masks import full_masks
from tests.outputs import SHAPES_LABELS, ground_truth_detections, write_output

SEED, COUNT = 5, 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("gt") / "images"
    gt = write_dataset(str(root), seed=SEED, count=COUNT)
    return root, gt


def make_output(out: Path, root: Path, run_id: str, shift: int = 0, **kwargs: Any) -> None:
    images = [
        (
            (root / image.file_name).as_uri(),
            (image.pixels.shape[1], image.pixels.shape[0]),
            ground_truth_detections(image, shift),
        )
        for image in generate(SEED, COUNT)
    ]
    write_output(str(out), run_id, images, SHAPES_LABELS, **kwargs)


def test_predictions_equal_to_the_ground_truth_score_one(
    dataset: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = dataset
    make_output(tmp_path / "out", root, "exact")
    args = [
        "eval",
        "--output",
        str(tmp_path / "out"),
        "--annotations",
        str(root / "annotations.json"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{COUNT} images matched" in printed
    assert printed.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2
    metrics = json.loads(Path(layout.metrics(str(tmp_path / "out"), "exact")).read_text())
    assert metrics["stats"]["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["stats"]["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["images_matched"] == COUNT and metrics["matched_by"] == "file_name"


def test_a_shifted_copy_scores_what_pycocotools_gives(
    dataset: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = dataset
    make_output(tmp_path / "out", root, "shifted", shift=4)
    args = ["--output", str(tmp_path / "out"), "--annotations", str(root / "annotations.json")]
    assert main(["eval", *args]) == 0
    ours = json.loads(Path(layout.metrics(str(tmp_path / "out"), "shifted")).read_text())["stats"]

    # The same predictions built here, straight from the masks, and scored by pycocotools.
    results = []
    for image_id, image in enumerate(generate(SEED, COUNT), 1):
        det = ground_truth_detections(image, shift=4)
        for mask, label, score in zip(full_masks(det), det.labels, det.scores, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "score": float(score),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    for iou_type in ("bbox", "segm"):
        direct = _cocoeval(root / "annotations.json", results, iou_type)
        assert ours[iou_type]["AP"] < 0.95
        assert [ours[iou_type][name] for name in STAT_NAMES] == pytest.approx(direct, abs=1e-12)


def test_match_by_an_id_column(dataset: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, gt = dataset
    # Annotations whose file names match nothing; ids come from a manifest column.
    renamed = {**gt, "images": [{**i, "file_name": f"other/{i['id']}.png"} for i in gt["images"]]}
    (tmp_path / "gt.json").write_text(json.dumps(renamed))
    ids = [str(i["id"]) for i in gt["images"]]
    make_output(tmp_path / "out", root, "ids", extra={"coco_image_id": ids})
    args = ["eval", "--output", str(tmp_path / "out"), "--annotations", str(tmp_path / "gt.json")]
    assert main(args) == 2  # no file name matches
    assert main([*args, "--image-id-column", "coco_image_id"]) == 0
    stats = json.loads(Path(layout.metrics(str(tmp_path / "out"), "ids")).read_text())["stats"]
    assert stats["segm"]["AP"] == pytest.approx(1.0)


def test_export_coco_loads_in_pycocotools(
    dataset: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, gt = dataset
    out = tmp_path / "out"
    make_output(out, root, "r1")
    broken = [("file:///data/broken.jpg", None, None)]
    write_output(str(out), "r1", broken, SHAPES_LABELS)
    results, data = tmp_path / "results.json", tmp_path / "dataset.json"
    args = ["export", "--output", str(out), "--format", "coco", "--to", str(results)]
    assert main([*args, "--dataset", str(data)]) == 0
    dataset_json = json.loads(data.read_text())
    assert len(dataset_json["images"]) == COUNT  # the undecodable image has no size: left out
    assert {c["name"] for c in dataset_json["categories"]} == set(SHAPES_LABELS[1:])
    first = dataset_json["images"][0]
    assert first["coco_url"].startswith("file:///") and not first["file_name"].startswith("/")
    assert first["coco_url"].endswith("/" + first["file_name"])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(data))
        loaded = coco.loadRes(str(results))
    assert len(loaded.getAnnIds()) == sum(len(a) for a in [gt["annotations"]])
    # Every exported mask sits on its image: decode one per image and compare sizes.
    for image in coco.loadImgs(coco.getImgIds()):
        for ann in loaded.loadAnns(loaded.getAnnIds(imgIds=image["id"]))[:1]:
            assert loaded.annToMask(ann).shape == (image["height"], image["width"])

    assert main([*args, "--min-score", "0.995"]) == 0
    strong = json.loads(results.read_text())
    assert strong and all(r["score"] >= 0.995 for r in strong)


def test_which_run(
    dataset: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = dataset
    make_output(tmp_path / "out", root, "a")
    make_output(tmp_path / "out", root, "b", shift=2)
    args = ["--output", str(tmp_path / "out"), "--annotations", str(root / "annotations.json")]
    assert main(["eval", *args]) == 2
    assert "holds 2 runs (a, b); pick one with --run-id" in capsys.readouterr().err
    assert main(["eval", *args, "--run-id", "c"]) == 2
    assert main(["eval", *args, "--run-id", "b"]) == 0
    (tmp_path / "bad.json").write_text('{"images": []}')
    bad = ["eval", "--output", str(tmp_path / "out"), "--annotations", str(tmp_path / "bad.json")]
    assert main([*bad, "--run-id", "a"]) == 2
    assert "is not a COCO instances file" in capsys.readouterr().err


def _cocoeval(annotations: Path, results: list[dict[str, Any]], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(results), iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_eval_export_and_render_on_object_storage(s3_env: str, tmp_path: Path) -> None:
    """Output, images and annotations all in S3 (the loopback server), results back there."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("coco-s3")
    gt = write_dataset("s3://coco-s3/images", seed=SEED, count=4)
    rows = [
        (
            f"s3://coco-s3/images/{image.file_name}",
            (image.pixels.shape[1], image.pixels.shape[0]),
            ground_truth_detections(image),
        )
        for image in generate(SEED, 4)
    ]
    write_output("s3://coco-s3/out", "s3run", rows, SHAPES_LABELS)
    out = ["--output", "s3://coco-s3/out"]
    assert main(["eval", *out, "--annotations", "s3://coco-s3/images/annotations.json"]) == 0
    with fs.open("coco-s3/out/_runs/s3run.metrics.json") as f:
        assert json.load(f)["stats"]["segm"]["AP"] == pytest.approx(1.0)
    assert main(["export", *out, "--to", "s3://coco-s3/export/results.json",
                 "--dataset", "s3://coco-s3/export/dataset.json"]) == 0  # fmt: skip
    with fs.open("coco-s3/export/results.json") as f:
        assert len(json.load(f)) == len(gt["annotations"])
    with fs.open("coco-s3/export/dataset.json") as f:
        assert json.load(f)["images"][0]["file_name"].startswith("images/shapes_")
    assert main(["render", *out, "--to", str(tmp_path / "gallery")]) == 0
    assert len(list((tmp_path / "gallery").glob("*.png"))) == 4
