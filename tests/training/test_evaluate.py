"""Metrics on the real COCO sample: ground truth scores 100, a known perturbation scores what a plain count says."""

import numpy as np
import pytest
from scipy import ndimage

from mask2former.training.data import load_dataset_for_segmentation, semantic_label_map
from mask2former.training.metrics import (
    InstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    build_evaluator,
    panoptic_image_statistics,
)

# the perturbation, on image 439180 (see the sample's panoptic JSON)
REMOVED = 2823390  # a person
RELABELLED = 4587520  # a truck, predicted as a horse
ERODED = 16758454  # a horse, eroded by 2 pixels
NEW_LABEL_NAME = "horse"


@pytest.fixture
def sample(coco_sample_root):
    loaded = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic")
    return [loaded.dataset[0], loaded.dataset[1]], loaded.label_info


def _panoptic_prediction(record, label_of=None, segment_map=None):
    label_of = label_of or dict(zip(record["segment_ids"], record["class_labels"]))
    segment_map = record["segment_map"] if segment_map is None else segment_map
    present = set(np.unique(segment_map).tolist())
    return {
        "segmentation": segment_map,
        "segments_info": [
            {"id": segment_id, "label_id": label_of[segment_id], "score": 1.0}
            for segment_id in record["segment_ids"]
            if segment_id in present
        ],
    }


def _perturb(record, label_info):
    """The prediction with one segment removed, one relabelled and one eroded, and the eroded IoU."""
    segment_map = record["segment_map"].copy()
    segment_map[segment_map == REMOVED] = 0
    eroded_mask = record["segment_map"] == ERODED
    kept = ndimage.binary_erosion(eroded_mask, iterations=2)
    segment_map[eroded_mask & ~kept] = 0
    eroded_iou = kept.sum() / eroded_mask.sum()
    label_of = dict(zip(record["segment_ids"], record["class_labels"]))
    label_of[RELABELLED] = label_info.label2id[NEW_LABEL_NAME]
    return segment_map, label_of, float(eroded_iou)


def test_ground_truth_scores_100(sample):
    records, label_info = sample
    predictions = [_panoptic_prediction(record) for record in records]

    panoptic = PanopticEvaluator.from_label_info(label_info)
    panoptic.update(predictions, records)
    assert all(value == pytest.approx(100.0) for value in panoptic.compute().values())

    instance = InstanceEvaluator(label_info.thing_ids)
    instance.update(predictions, records)
    results = instance.compute()
    assert results["AP"] == pytest.approx(100.0)
    assert results["AP50"] == pytest.approx(100.0)

    semantic = SemanticEvaluator(label_info.num_labels)
    semantic.update([semantic_label_map(record) for record in records], records)
    assert semantic.compute() == pytest.approx({"mIoU": 100.0, "fwIoU": 100.0, "mACC": 100.0, "pACC": 100.0})


def test_panoptic_quality_of_a_perturbed_prediction(sample):
    records, label_info = sample
    segment_map, label_of, eroded_iou = _perturb(records[1], label_info)
    assert 0.5 < eroded_iou < 0.9  # a true positive with IoU < 1
    predictions = [_panoptic_prediction(records[0]), _panoptic_prediction(records[1], label_of, segment_map)]
    evaluator = PanopticEvaluator.from_label_info(label_info)
    evaluator.update(predictions, records)
    results = evaluator.compute()

    # plain count: every non-crowd segment matches itself with IoU 1, except the three edited ones
    tp, fp, fn, iou = {}, {}, {}, {}
    for record in records:
        for segment_id, label, crowd in zip(record["segment_ids"], record["class_labels"], record["iscrowd"]):
            for table in (tp, fp, fn, iou):
                table.setdefault(label, 0)
            if crowd:
                continue  # a crowd region predicted as itself is neither matched nor a false positive
            if record is records[1] and segment_id == REMOVED:
                fn[label] += 1
            elif record is records[1] and segment_id == RELABELLED:
                fn[label] += 1
                new_label = label_info.label2id[NEW_LABEL_NAME]
                fp[new_label] = fp.get(new_label, 0) + 1
            elif record is records[1] and segment_id == ERODED:
                tp[label] += 1
                iou[label] += eroded_iou  # the eroded pixels are void in the prediction: union = ground truth
            else:
                tp[label] += 1
                iou[label] += 1.0
    classes = [label for label in tp if tp[label] + fp[label] + fn[label] > 0]
    pq = {label: iou[label] / (tp[label] + fp[label] / 2 + fn[label] / 2) for label in classes}
    sq = {label: iou[label] / tp[label] if tp[label] else 0.0 for label in classes}
    things = [label for label in classes if label in label_info.thing_ids]
    stuff = [label for label in classes if label not in label_info.thing_ids]
    assert results["PQ"] == pytest.approx(100 * sum(pq.values()) / len(classes))
    assert results["SQ"] == pytest.approx(100 * sum(sq.values()) / len(classes))
    assert results["PQ_th"] == pytest.approx(100 * sum(pq[label] for label in things) / len(things))
    assert results["PQ_st"] == pytest.approx(100.0) and len(stuff) == 4
    assert results["PQ"] < 100


def _recall_points(recall):
    """How many of COCO's 101 recall thresholds (0, 0.01, ..., 1) a precision-1 curve reaching `recall` covers."""
    return sum(1 for step in range(101) if step / 100 <= recall + 1e-12)


def test_mask_ap_of_a_perturbed_prediction(sample):
    records, label_info = sample
    segment_map, label_of, eroded_iou = _perturb(records[1], label_info)
    perturbed = _panoptic_prediction(records[1], label_of, segment_map)
    # exact segments score 1.0, the eroded one 0.9, the relabelled one 0.5: every miss ranks after every hit
    for info in perturbed["segments_info"]:
        info["score"] = {ERODED: 0.9, RELABELLED: 0.5}.get(info["id"], 1.0)
    evaluator = InstanceEvaluator(label_info.thing_ids)
    evaluator.update([_panoptic_prediction(records[0]), perturbed], records)
    results = evaluator.compute()

    # per thing class and IoU threshold: precision 1 up to the recall of the segments still matched, then nothing
    ground_truth = {}  # label -> number of non-crowd segments
    for record in records:
        for label, crowd in zip(record["class_labels"], record["iscrowd"]):
            if label in label_info.thing_ids and not crowd:
                ground_truth[label] = ground_truth.get(label, 0) + 1
    person, truck, horse = (label_info.label2id[name] for name in ("person", "truck", "horse"))
    thresholds = [0.5 + 0.05 * step for step in range(10)]
    average_precision = {}
    for label, count in ground_truth.items():
        per_threshold = []
        for threshold in thresholds:
            matched = count
            if label == person or label == truck:  # the removed person, the relabelled truck
                matched -= 1
            if label == horse and eroded_iou < threshold:
                matched -= 1
            per_threshold.append(_recall_points(matched / count) / 101)
        average_precision[label] = per_threshold
    expected_ap = 100 * np.mean([np.mean(values) for values in average_precision.values()])
    expected_ap50 = 100 * np.mean([values[0] for values in average_precision.values()])
    assert results["AP"] == pytest.approx(expected_ap, abs=1e-6)
    assert results["AP50"] == pytest.approx(expected_ap50, abs=1e-6)
    assert results["AP"] < results["AP50"] < 100


def test_miou_of_a_perturbed_prediction(sample):
    records, label_info = sample
    segment_map, label_of, _ = _perturb(records[1], label_info)
    ignore = label_info.ignore_label
    predictions = [semantic_label_map(records[0])]
    lookup = {0: ignore, **label_of}
    predictions.append(np.vectorize(lambda segment_id: lookup[segment_id])(segment_map))
    targets = [semantic_label_map(record) for record in records]
    evaluator = SemanticEvaluator(label_info.num_labels, ignore)
    evaluator.update(predictions, records)
    results = evaluator.compute()

    # plain per-class pixel counts over labelled pixels (a prediction of "ignore" there is a miss)
    gt = np.concatenate([t.ravel() for t in targets])
    pred = np.concatenate([p.ravel() for p in predictions])
    labelled = gt != ignore
    gt, pred = gt[labelled], pred[labelled]
    ious, weights, accuracies = [], [], []
    for label in np.unique(gt):
        both = np.sum((gt == label) & (pred == label))
        ious.append(both / (np.sum(gt == label) + np.sum(pred == label) - both))
        weights.append(np.sum(gt == label) / gt.size)
        accuracies.append(both / np.sum(gt == label))
    assert results["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert results["fwIoU"] == pytest.approx(100 * np.dot(weights, ious))
    assert results["mACC"] == pytest.approx(100 * np.mean(accuracies))
    assert results["pACC"] == pytest.approx(100 * np.mean(gt == pred))
    assert results["mIoU"] < 100


def test_void_and_crowd_rules_on_a_toy_image():
    # ground truth: segment 1 (label 0) left half, crowd segment 2 (label 0) top-right, void bottom-right
    target = np.zeros((4, 8), dtype=np.int64)
    target[:, :4] = 1
    target[:2, 4:] = 2
    # prediction: segment 5 = the left half (match), segment 6 covers the crowd + void quarter (not a false positive)
    prediction = np.zeros((4, 8), dtype=np.int64)
    prediction[:, :4] = 5
    prediction[:, 4:] = 6
    stats = panoptic_image_statistics(target, [(1, 0, False), (2, 0, True)], prediction, [(5, 0), (6, 0)], 2)
    assert stats[:, 0].tolist() == [1, 0, 0, 1.0]
    # the same segment 6 labelled 1: the crowd region is of another class, only half of it is void -> not ignored
    stats = panoptic_image_statistics(target, [(1, 0, False), (2, 0, True)], prediction, [(5, 0), (6, 1)], 2)
    assert stats[1, 1] == 1 and stats[1, 0] == 0
    # void is removed from the union: a prediction spilling onto void keeps IoU 1
    prediction[:, :4] = 5
    prediction[2:, 4:] = 5
    stats = panoptic_image_statistics(target, [(1, 0, False), (2, 0, True)], prediction, [(5, 0), (6, 0)], 2)
    assert stats[:, 0].tolist() == [1, 0, 0, pytest.approx(1.0)]
    # once those pixels are labelled (not void) the spill counts in the union: IoU 16 / 24
    target[2:, 4:] = 3
    stats = panoptic_image_statistics(
        target, [(1, 0, False), (2, 0, True), (3, 1, False)], prediction, [(5, 0), (6, 0)], 2
    )
    assert stats[3, 0] == pytest.approx(16 / 24) and stats[2, 1] == 1


def test_bad_predictions_raise_naming_the_image(sample):
    records, label_info = sample
    evaluator = PanopticEvaluator.from_label_info(label_info)
    prediction = _panoptic_prediction(records[0])
    with pytest.raises(ValueError, match="142238.*not in segments_info"):
        evaluator.update([{**prediction, "segments_info": prediction["segments_info"][1:]}], [records[0]])
    with pytest.raises(ValueError, match="142238.*ground truth"):
        evaluator.update([{**prediction, "segmentation": prediction["segmentation"][:-1]}], [records[0]])
    bad_label = [{**info, "label_id": 999} for info in prediction["segments_info"]]
    with pytest.raises(ValueError, match="label 999"):
        evaluator.update([{**prediction, "segments_info": bad_label}], [records[0]])
    with pytest.raises(ValueError, match="shape"):
        SemanticEvaluator(label_info.num_labels).update([np.zeros((2, 2))], [records[0]])


def test_instance_evaluator_with_a_coco_json_and_binary_maps(sample, coco_sample_root):
    records, label_info = sample
    # (N, H, W) binary maps in segments_info order, labels mapped to the JSON's category ids
    predictions = []
    for record in records:
        maps = np.stack([record["segment_map"] == segment_id for segment_id in record["segment_ids"]])
        infos = [{"id": i, "label_id": label, "score": 1.0} for i, label in enumerate(record["class_labels"])]
        predictions.append({"segmentation": maps, "segments_info": infos})
    evaluator = InstanceEvaluator(
        ground_truth=coco_sample_root / "annotations" / "instances_val2017.json",
        label_to_category_id=label_info.category_ids,
    )
    evaluator.update(predictions, image_ids=[record["image_id"] for record in records])
    assert evaluator.compute()["AP"] == pytest.approx(100.0)


def test_gather_sums_statistics_across_processes(sample, monkeypatch):
    """Two "processes" each see one image: the gathered result equals one process seeing both."""
    import mask2former.training.metrics as metrics_module

    records, label_info = sample
    segment_map, label_of, _ = _perturb(records[1], label_info)
    predictions = [_panoptic_prediction(records[0]), _panoptic_prediction(records[1], label_of, segment_map)]
    single = PanopticEvaluator.from_label_info(label_info)
    single.update(predictions, records)
    first, second = PanopticEvaluator.from_label_info(label_info), PanopticEvaluator.from_label_info(label_info)
    first.update(predictions[:1], records[:1])
    second.update(predictions[1:], records[1:])
    expected = single.compute()
    monkeypatch.setattr(metrics_module, "_gather", lambda objects: [objects, second.statistics])
    assert first.compute() == pytest.approx(expected)
    assert expected["PQ"] < 100


def test_listed_segment_id_zero_is_a_segment_and_unlisted_negative_ids_are_void(sample):
    records, label_info = sample
    record = records[0]
    reference = panoptic_image_statistics(
        record["segment_map"],
        list(zip(record["segment_ids"], record["class_labels"], record["iscrowd"])),
        record["segment_map"],
        list(zip(record["segment_ids"], record["class_labels"])),
        label_info.num_labels,
    )
    # renumber the prediction 0..N-1 with -1 for "no segment" (transformers' instance convention)
    renumbered = np.full(record["segment_map"].shape, -1, dtype=np.int64)
    for new_id, segment_id in enumerate(record["segment_ids"]):
        renumbered[record["segment_map"] == segment_id] = new_id
    statistics = panoptic_image_statistics(
        record["segment_map"],
        list(zip(record["segment_ids"], record["class_labels"], record["iscrowd"])),
        renumbered,
        list(enumerate(record["class_labels"])),
        label_info.num_labels,
    )
    assert np.array_equal(statistics, reference)
    assert statistics[0].sum() == sum(1 for crowd in record["iscrowd"] if not crowd)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_build_evaluator(sample, task):
    records, label_info = sample
    evaluator = build_evaluator(task, label_info)
    if task == "semantic":
        evaluator.update([semantic_label_map(record) for record in records], records)
        assert evaluator.compute()["mIoU"] == pytest.approx(100.0)
    else:
        evaluator.update([_panoptic_prediction(record) for record in records], records)
        assert evaluator.compute()["PQ" if task == "panoptic" else "AP"] == pytest.approx(100.0)


def _distributed_worker(rank, world_size, init_file, records, predictions, num_labels, thing_ids, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # each process sees its own image; compute() gathers once
        evaluators = {
            "panoptic": PanopticEvaluator(num_labels, thing_ids),
            "instance": InstanceEvaluator(thing_ids),
            "semantic": SemanticEvaluator(num_labels),
        }
        evaluators["panoptic"].update(predictions[rank : rank + 1], records[rank : rank + 1])
        evaluators["instance"].update(predictions[rank : rank + 1], records[rank : rank + 1])
        evaluators["semantic"].update([semantic_label_map(records[rank])], records[rank : rank + 1])
        queue.put((rank, {name: evaluator.compute() for name, evaluator in evaluators.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch
def test_two_processes_gather_to_the_single_process_result(sample, tmp_path):
    import torch.multiprocessing as mp

    records, label_info = sample
    segment_map, label_of, _ = _perturb(records[1], label_info)
    predictions = [_panoptic_prediction(records[0]), _panoptic_prediction(records[1], label_of, segment_map)]
    for info in predictions[1]["segments_info"]:
        info["score"] = 0.5 if info["id"] == RELABELLED else 1.0
    plain = [{key: value for key, value in record.items() if key != "image"} for record in records]
    single = {
        "panoptic": PanopticEvaluator.from_label_info(label_info),
        "instance": InstanceEvaluator(label_info.thing_ids),
        "semantic": SemanticEvaluator(label_info.num_labels),
    }
    single["panoptic"].update(predictions, plain)
    single["instance"].update(predictions, plain)
    single["semantic"].update([semantic_label_map(record) for record in plain], plain)
    expected = {name: evaluator.compute() for name, evaluator in single.items()}

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    arguments = (2, str(tmp_path / "init"), plain, predictions, label_info.num_labels, label_info.thing_ids, queue)
    mp.start_processes(_distributed_worker, args=arguments, nprocs=2, join=True, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert expected["panoptic"]["PQ"] < 100 and expected["instance"]["AP"] < 100
    for rank in (0, 1):
        for name in expected:
            assert results[rank][name] == pytest.approx(expected[name], nan_ok=True)


def test_instance_predictions_as_rles(sample):
    """``return_coco_annotation=True`` output: a list of COCO RLEs in segments_info order."""
    from pycocotools import mask as mask_utils

    records, label_info = sample
    predictions = []
    for record in records:
        things = [
            (segment_id, label)
            for segment_id, label in zip(record["segment_ids"], record["class_labels"])
            if label in label_info.thing_ids
        ]
        rles = [
            mask_utils.encode(np.asfortranarray((record["segment_map"] == segment_id).astype(np.uint8)))
            for segment_id, _ in things
        ]
        infos = [{"id": index, "label_id": label, "score": 1.0} for index, (_, label) in enumerate(things)]
        predictions.append({"segmentation": rles, "segments_info": infos})
    evaluator = InstanceEvaluator(label_info.thing_ids)
    evaluator.update(predictions, records)
    assert evaluator.compute()["AP"] == pytest.approx(100.0)
    # dropping every horse: horse AP is 0, the other classes stay at 100
    for prediction in predictions:
        keep = [
            i for i, info in enumerate(prediction["segments_info"]) if label_info.id2label[info["label_id"]] != "horse"
        ]
        prediction["segmentation"] = [prediction["segmentation"][i] for i in keep]
        prediction["segments_info"] = [prediction["segments_info"][i] for i in keep]
    evaluator.reset()
    evaluator.update(predictions, records)
    classes = {
        label
        for record in records
        for label, crowd in zip(record["class_labels"], record["iscrowd"])
        if label in label_info.thing_ids and not crowd
    }
    assert evaluator.compute()["AP"] == pytest.approx(100 * (len(classes) - 1) / len(classes))


def test_build_instance_evaluator_on_a_coco_json(sample, coco_sample_root):
    records, label_info = sample
    evaluator = build_evaluator(
        "instance", label_info, instance_ground_truth=coco_sample_root / "annotations" / "instances_val2017.json"
    )
    predictions = [_panoptic_prediction(record) for record in records]
    evaluator.update(predictions, records)  # the targets only give the image ids here
    assert evaluator.compute()["AP"] == pytest.approx(100.0)
    # without the horses, horse AP is 0; the JSON's stuff annotations are not part of instance AP
    for prediction in predictions:
        prediction["segments_info"] = [
            i for i in prediction["segments_info"] if label_info.id2label[i["label_id"]] != "horse"
        ]
    evaluator.reset()
    evaluator.update(predictions, records)
    classes = {
        label
        for record in records
        for label, crowd in zip(record["class_labels"], record["iscrowd"])
        if label in label_info.thing_ids and not crowd
    }
    assert evaluator.compute()["AP"] == pytest.approx(100 * (len(classes) - 1) / len(classes))
