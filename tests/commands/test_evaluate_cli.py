"""`mask2former evaluate` on prediction files in the datasets' own formats."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mask2former.commands import main as cli_main


def _run(capsys, *arguments):
    code = cli_main(["evaluate", *map(str, arguments)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def _panoptic_predictions(coco_sample_root, folder):
    """The ground truth written as a prediction: JSON + PNG folder named like the JSON without `.json`."""
    folder.mkdir()
    shutil.copytree(coco_sample_root / "annotations" / "panoptic_val2017", folder / "predictions")
    data = json.loads((coco_sample_root / "annotations" / "panoptic_val2017.json").read_text())
    (folder / "predictions.json").write_text(json.dumps({"annotations": data["annotations"]}))
    for path in (folder / "predictions").iterdir():
        path.chmod(0o644)
    return folder / "predictions.json", data


def test_panoptic_ground_truth_scores_100(coco_sample_root, tmp_path, capsys):
    predictions, _ = _panoptic_predictions(coco_sample_root, tmp_path / "pred")
    code, metrics, _ = _run(
        capsys, "--task", "panoptic", "--ground-truth", coco_sample_root, "--predictions", predictions
    )
    assert code == 0
    assert metrics["PQ"] == pytest.approx(100.0) and metrics["PQ_th"] == pytest.approx(100.0)
    assert metrics["num_images"] == 2 and metrics["skipped"] == 0


def test_panoptic_with_one_segment_removed(coco_sample_root, tmp_path, capsys):
    predictions, data = _panoptic_predictions(coco_sample_root, tmp_path / "pred")
    # move the PNGs to another folder, given with --predictions-dir
    png_dir = tmp_path / "pngs"
    shutil.move(str(tmp_path / "pred" / "predictions"), png_dir)
    annotation = data["annotations"][0]
    removed = annotation["segments_info"][0]  # a person (category 1)
    png_path = png_dir / annotation["file_name"]
    colour = np.asarray(Image.open(png_path)).copy()
    wide = colour.astype(np.int64)
    ids = wide[..., 0] + 256 * wide[..., 1] + 65536 * wide[..., 2]
    colour[ids == removed["id"]] = 0
    Image.fromarray(colour).save(png_path)
    annotation["segments_info"] = annotation["segments_info"][1:]
    predictions.write_text(json.dumps({"annotations": data["annotations"]}))
    code, metrics, _ = _run(
        capsys,
        "--task",
        "panoptic",
        "--ground-truth",
        coco_sample_root,
        "--split",
        "val2017",
        "--predictions",
        predictions,
        "--predictions-dir",
        png_dir,
    )
    assert code == 0
    # plain count: classes present in the ground truth; person has one false negative, every other class is perfect
    segments = [s for a in data["annotations"] for s in a["segments_info"]] + [removed]
    classes = {s["category_id"] for s in segments}
    persons = sum(1 for s in segments if s["category_id"] == 1 and not s["iscrowd"])
    pq_person = (persons - 1) / (persons - 1 + 0.5)
    assert metrics["PQ"] == pytest.approx(100 * (pq_person + len(classes) - 1) / len(classes))
    assert metrics["SQ"] == pytest.approx(100.0)


def test_panoptic_missing_prediction_is_named_or_skipped(coco_sample_root, tmp_path, capsys):
    predictions, data = _panoptic_predictions(coco_sample_root, tmp_path / "pred")
    predictions.write_text(json.dumps({"annotations": data["annotations"][:1]}))
    code, _, error = _run(
        capsys, "--task", "panoptic", "--ground-truth", coco_sample_root, "--predictions", predictions
    )
    assert code == 1 and "439180" in error and "no prediction" in error
    code, metrics, _ = _run(
        capsys,
        "--task",
        "panoptic",
        "--ground-truth",
        coco_sample_root,
        "--predictions",
        predictions,
        "--skip-bad-input",
    )
    assert code == 0 and metrics["skipped"] == 1 and metrics["num_images"] == 1 and metrics["PQ"] == 100.0


def test_panoptic_unknown_category_is_named(coco_sample_root, tmp_path, capsys):
    predictions, data = _panoptic_predictions(coco_sample_root, tmp_path / "pred")
    data["annotations"][1]["segments_info"][2]["category_id"] = 4242
    predictions.write_text(json.dumps({"annotations": data["annotations"]}))
    code, _, error = _run(
        capsys, "--task", "panoptic", "--ground-truth", coco_sample_root, "--predictions", predictions
    )
    assert code == 1 and "439180" in error and "4242" in error


def _instance_results(coco_sample_root, path, drop_first=False):
    data = json.loads((coco_sample_root / "annotations" / "instances_val2017.json").read_text())
    annotations = data["annotations"][1:] if drop_first else data["annotations"]
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in annotations
    ]
    path.write_text(json.dumps(results))
    return results, data


def test_instance_results(coco_sample_root, tmp_path, capsys):
    results_path = tmp_path / "results.json"
    _instance_results(coco_sample_root, results_path)
    code, metrics, _ = _run(
        capsys, "--task", "instance", "--ground-truth", coco_sample_root, "--predictions", results_path
    )
    assert code == 0 and metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)

    # one person missed: AP over the categories with ground truth, person's curve stops at recall (n - 1) / n
    _, data = _instance_results(coco_sample_root, results_path, drop_first=True)
    code, metrics, _ = _run(
        capsys, "--task", "instance", "--ground-truth", coco_sample_root, "--predictions", results_path
    )
    categories = {a["category_id"] for a in data["annotations"] if not a["iscrowd"]}
    persons = sum(1 for a in data["annotations"] if a["category_id"] == 1 and not a["iscrowd"])
    person_ap = sum(1 for step in range(101) if step / 100 <= (persons - 1) / persons) / 101
    assert metrics["AP"] == pytest.approx(100 * (person_ap + len(categories) - 1) / len(categories))

    results, _ = _instance_results(coco_sample_root, results_path)
    results[3]["image_id"] = 777
    results_path.write_text(json.dumps(results))
    code, _, error = _run(
        capsys, "--task", "instance", "--ground-truth", coco_sample_root, "--predictions", results_path
    )
    assert code == 1 and "777" in error and "detection 3" in error
    code, metrics, _ = _run(
        capsys,
        "--task",
        "instance",
        "--ground-truth",
        coco_sample_root,
        "--predictions",
        results_path,
        "--skip-bad-input",
    )
    assert code == 0 and metrics["skipped"] == 1


def _fake_ade20k(root):
    rng = np.random.default_rng(0)
    for folder in ("training", "validation"):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for index in range(2):
            stem = f"ADE_{folder}_{index:08d}"
            Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(
                root / "images" / folder / f"{stem}.jpg"
            )
            annotation = np.zeros((16, 20), dtype=np.uint8)
            annotation[:, :10] = 1 + index
            annotation[:8, 10:] = 150
            Image.fromarray(annotation).save(root / "annotations" / folder / f"{stem}.png")
    return root


def test_semantic_pngs(tmp_path, capsys):
    root = _fake_ade20k(tmp_path / "ADEChallengeData2016")
    predictions = tmp_path / "semantic"
    shutil.copytree(root / "annotations" / "validation", predictions)
    code, metrics, _ = _run(capsys, "--task", "semantic", "--ground-truth", root, "--predictions", predictions)
    assert code == 0 and metrics["mIoU"] == pytest.approx(100.0) and metrics["pACC"] == pytest.approx(100.0)

    # image 1: its class-2 half predicted as class 150. Plain count over labelled pixels of both images:
    # class 1: 80/80; class 2: 0 of 80 (IoU 0); class 150: 40 + 40 gt pixels, predicted on 80 + 80 -> IoU 80 / 160
    path = predictions / "ADE_validation_00000001.png"
    values = np.asarray(Image.open(path)).copy()
    values[:, :10] = 150
    Image.fromarray(values).save(path)
    code, metrics, _ = _run(
        capsys, "--task", "semantic", "--ground-truth", root, "--split", "validation", "--predictions", predictions
    )
    assert metrics["mIoU"] == pytest.approx(100 * (1.0 + 0.0 + 80 / 160) / 3)
    assert metrics["pACC"] == pytest.approx(100 * 160 / 240)

    path.unlink()
    code, _, error = _run(capsys, "--task", "semantic", "--ground-truth", root, "--predictions", predictions)
    assert code == 1 and "ADE_validation_00000001.png" in error


def test_instance_results_against_panoptic_ground_truth(coco_sample_root, tmp_path, capsys):
    """A root with only panoptic annotations: the ground truth is its thing segments."""
    root = tmp_path / "coco"
    shutil.copytree(coco_sample_root, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    results_path = tmp_path / "results.json"
    results, data = _instance_results(coco_sample_root, results_path)
    (root / "annotations" / "instances_val2017.json").unlink()
    code, metrics, _ = _run(capsys, "--task", "instance", "--ground-truth", root, "--predictions", results_path)
    assert code == 0 and metrics["AP"] == pytest.approx(100.0)
    # missing one horse: horse's curve stops at (n - 1) / n; the other thing classes stay perfect
    things = {
        c["id"]
        for c in json.loads((root / "annotations" / "panoptic_coco_categories.json").read_text())
        if c["isthing"]
    }
    horse = next(i for i, r in enumerate(results) if r["category_id"] == 19)
    results_path.write_text(json.dumps(results[:horse] + results[horse + 1 :]))
    code, metrics, _ = _run(capsys, "--task", "instance", "--ground-truth", root, "--predictions", results_path)
    categories = {a["category_id"] for a in data["annotations"] if not a["iscrowd"] and a["category_id"] in things}
    horses = sum(1 for a in data["annotations"] if a["category_id"] == 19 and not a["iscrowd"])
    horse_ap = sum(1 for step in range(101) if step / 100 <= (horses - 1) / horses) / 101
    assert metrics["AP"] == pytest.approx(100 * (horse_ap + len(categories) - 1) / len(categories))
