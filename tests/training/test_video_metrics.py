"""Video AP: on one-frame videos it is COCO mask AP (pycocotools on the same masks); tube IoU by hand; formats."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mask2former.training.video_metrics import VideoInstanceEvaluator, evaluate_video_results, tube_ious


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def box_mask(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + box_height, left : left + box_width] = True
    return mask


def random_image_problem(seed: int = 0, num_images: int = 8, size: int = 64):
    """COCO-style ground truth and detections: jittered copies of the objects, misclassified ones, false positives."""
    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for image_id in range(1, num_images + 1):
        for _ in range(rng.integers(1, 5)):
            top, left = rng.integers(0, size - 8, 2)
            box_height, box_width = rng.integers(4, 40, 2)
            category = int(rng.integers(1, 4))
            mask = box_mask(size, size, top, left, box_height, box_width)
            truths.append((image_id, category, mask))
            for _ in range(rng.integers(0, 3)):  # detections of this object, more or less accurate
                shift = rng.integers(-4, 5, 2)
                shifted = np.roll(mask, tuple(shift), axis=(0, 1))
                label = category if rng.random() < 0.8 else int(rng.integers(1, 4))
                detections.append((image_id, label, shifted, float(rng.random())))
        for _ in range(rng.integers(0, 3)):  # false positives
            top, left = rng.integers(0, size - 8, 2)
            mask = box_mask(size, size, top, left, *rng.integers(4, 30, 2))
            detections.append((image_id, int(rng.integers(1, 4)), mask, float(rng.random())))
    return truths, detections, size


def coco_mask_ap(truths, detections, size) -> dict:
    coco_truth = COCO()
    coco_truth.dataset = {
        "images": [{"id": i, "height": size, "width": size} for i in sorted({t[0] for t in truths})],
        "categories": [{"id": c} for c in (1, 2, 3)],
        "annotations": [
            {
                "id": k + 1,
                "image_id": i,
                "category_id": c,
                "iscrowd": 0,
                "segmentation": rle(m),
                "area": float(m.sum()),
            }
            for k, (i, c, m) in enumerate(truths)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_truth.createIndex()
        coco_detections = coco_truth.loadRes(
            [{"image_id": i, "category_id": c, "segmentation": rle(m), "score": s} for i, c, m, s in detections]
        )
        evaluation = COCOeval(coco_truth, coco_detections, iouType="segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2], "AR1": stats[6], "AR10": stats[7]}


def one_frame_videos(truths, detections, size):
    ground_truth = {
        "videos": [
            {"id": i, "height": size, "width": size, "length": 1, "file_names": [f"{i}/0.jpg"]}
            for i in sorted({t[0] for t in truths})
        ],
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)],
        "annotations": [
            {"id": k + 1, "video_id": i, "category_id": c, "iscrowd": 0, "segmentations": [rle(m)]}
            for k, (i, c, m) in enumerate(truths)
        ],
    }
    results = [{"video_id": i, "category_id": c, "score": s, "segmentations": [rle(m)]} for i, c, m, s in detections]
    return ground_truth, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_frame_videos_give_coco_mask_ap(seed):
    truths, detections, size = random_image_problem(seed)
    expected = coco_mask_ap(truths, detections, size)
    assert 0.05 < expected["AP"] < 0.95  # an informative case, neither empty nor perfect
    ground_truth, results = one_frame_videos(truths, detections, size)
    metrics = evaluate_video_results(ground_truth, results)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value * 100, abs=1e-9), name


def test_tube_iou_sums_intersections_and_unions_over_frames():
    # frame 0: detection and ground truth overlap; frame 1: only the ground truth; frame 2: only the detection
    size = 32
    truth_0 = box_mask(size, size, 0, 0, 10, 10)  # 100 px
    detection_0 = box_mask(size, size, 5, 0, 10, 10)  # 100 px, 50 shared
    truth_1 = box_mask(size, size, 0, 0, 4, 5)  # 20 px
    detection_2 = box_mask(size, size, 20, 20, 3, 3)  # 9 px
    detection = [rle(detection_0), None, rle(detection_2)]
    truth = [rle(truth_0), rle(truth_1), None]
    detection = [{**r, "counts": r["counts"].encode()} if r else None for r in detection]
    truth = [{**r, "counts": r["counts"].encode()} if r else None for r in truth]
    expected = 50 / (150 + 20 + 9)
    assert tube_ious([detection], [truth], [0])[0, 0] == pytest.approx(expected)
    # a crowd ground truth divides by the detection's area only
    assert tube_ious([detection], [truth], [1])[0, 0] == pytest.approx(50 / 109)


def test_perfect_and_shifted_predictions_of_moving_objects():
    # two 4-frame videos, objects moving right 3 px per frame, one entering at frame 2
    size, num_frames = 48, 4
    tubes = {
        1: [(1, [box_mask(size, size, 10, 2 + 3 * t, 12, 12) for t in range(num_frames)])],
        2: [
            (2, [box_mask(size, size, 20, 5 + 3 * t, 15, 10) for t in range(num_frames)]),
            (1, [None, None] + [box_mask(size, size, 0, 30, 8, 8) for _ in range(2)]),
        ],
    }
    ground_truth = {
        "videos": [{"id": v, "height": size, "width": size, "length": num_frames} for v in tubes],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {
                "id": 10 * v + k,
                "video_id": v,
                "category_id": c,
                "iscrowd": 0,
                "segmentations": [rle(m) if m is not None else None for m in frames],
            }
            for v, items in tubes.items()
            for k, (c, frames) in enumerate(items)
        ],
    }

    def results(shift: int) -> list[dict]:
        return [
            {
                "video_id": v,
                "category_id": c,
                "score": 0.9,
                "segmentations": [rle(np.roll(m, shift, axis=1)) if m is not None else None for m in frames],
            }
            for v, items in tubes.items()
            for c, frames in items
        ]

    perfect = evaluate_video_results(ground_truth, results(0))
    assert perfect["AP"] == pytest.approx(100) and perfect["AR1"] == pytest.approx(100)
    shifted = evaluate_video_results(ground_truth, results(2))  # IoUs 0.6-0.7
    assert 0 < shifted["AP"] < perfect["AP"] and shifted["AP50"] == pytest.approx(100)


def test_polygons_and_uncompressed_rle_in_the_ground_truth():
    size = 20
    mask = box_mask(size, size, 2, 3, 6, 8)
    uncompressed = {"size": [size, size], "counts": []}
    flat = mask.flatten(order="F").astype(np.uint8)
    runs, current, count = [], 0, 0
    for value in flat:
        if value == current:
            count += 1
        else:
            runs.append(count)
            current, count = value, 1
    runs.append(count)
    uncompressed["counts"] = runs
    polygon = [[3, 2, 11, 2, 11, 8, 3, 8]]  # x, y corners of the same box (pixel edges)
    ground_truth = {
        "videos": [{"id": 1, "height": size, "width": size, "length": 3}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0, "segmentations": [uncompressed, polygon, None]}
        ],
    }
    results = [{"video_id": 1, "category_id": 1, "score": 1.0, "segmentations": [rle(mask), rle(mask), None]}]
    evaluator = VideoInstanceEvaluator(ground_truth)
    evaluator.add_results(results)
    truth = evaluator.truths[1][0]["rles"]
    assert mask_utils.decode(truth[0]).astype(bool).tolist() == mask.tolist()
    assert mask_utils.area(truth[1]) >= 40 and truth[2] is None
    assert evaluator.compute()["AP50"] == pytest.approx(100)


def test_results_with_the_wrong_number_of_frames_are_a_clear_error():
    ground_truth = {
        "videos": [{"id": 7, "height": 8, "width": 8, "length": 3}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [],
    }
    evaluator = VideoInstanceEvaluator(ground_truth)
    with pytest.raises(ValueError, match="has 2 frame masks but the video has 3 frames"):
        evaluator.add_results([{"video_id": 7, "category_id": 1, "score": 1.0, "segmentations": [None, None]}])
    with pytest.raises(ValueError, match="does not list"):
        evaluator.add_results([{"video_id": 8, "category_id": 1, "score": 1.0, "segmentations": [None] * 3}])
    with pytest.raises(ValueError, match="no 'annotations'"):
        VideoInstanceEvaluator({"videos": [], "categories": []})


def test_evaluate_command_scores_a_results_json(tmp_path, capsys):
    from mask2former.commands import main as cli_main

    truths, detections, size = random_image_problem(4)
    ground_truth, results = one_frame_videos(truths, detections, size)
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "results.json").write_text(json.dumps(results))
    arguments = ["--task", "video-instance", "--ground-truth", tmp_path / "gt.json"]
    code = cli_main(["evaluate", *map(str, arguments), "--predictions", str(tmp_path / "results.json")])
    metrics = json.loads(capsys.readouterr().out)
    assert code == 0 and metrics == pytest.approx(evaluate_video_results(ground_truth, results), nan_ok=True)
    assert metrics["AP"] == pytest.approx(coco_mask_ap(truths, detections, size)["AP"] * 100)
