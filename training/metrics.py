"""Benchmark metrics: panoptic quality, mask AP and mIoU, accumulated batch by batch, gathered once.

API
---
Each evaluator has ``update(predictions, targets)`` (call it per batch, in each process), ``compute() -> dict[str,
float]`` (gathers across ``torch.distributed`` processes once, if initialised, and returns percentages) and
``reset()``. A *target* is a segmentation record (``training/data/records.py``) or the ``"targets"`` entries of
``SegmentationCollator(keep_targets=True)``: ``segment_map`` ``(H, W)`` ids (0 = void), ``segment_ids``,
``class_labels``, ``iscrowd``, ``image_id``.

- ``PanopticEvaluator(num_labels, thing_ids)``: PQ / SQ / RQ for all, things (``_th``) and stuff (``_st``) classes,
  with panopticapi's algorithm (match when IoU > 0.5; void pixels are removed from the union; unmatched predictions
  covered more than half by void or by a crowd region of their class are not false positives; crowd segments are not
  false negatives). Predictions: ``{"segmentation": (H, W) ids, "segments_info": [{"id", "label_id"}, ...]}`` as
  ``post_process_panoptic_segmentation`` returns them (unlisted ids <= 0 are "no segment"). Memory: 4 numbers per
  class.
- ``InstanceEvaluator(thing_ids=None, ground_truth=None)``: COCO mask AP, AP50, AP75, APs, APm, APl through
  pycocotools' ``COCOeval`` (segm). Predictions: ``post_process_instance_segmentation`` output (an id map, or with
  ``return_binary_maps=True`` ``(N, H, W)`` masks, or with ``return_coco_annotation=True`` RLEs, plus
  ``segments_info`` with ``label_id`` and ``score``), or
  ``{"rles", "labels", "scores"}``. Ground truth is the targets' thing segments, or a COCO instances JSON
  (``ground_truth=path``). Only RLEs are kept, never full-resolution masks. A size range without ground truth
  gives NaN (COCOeval's -1), not a score.
- ``SemanticEvaluator(num_labels, ignore_label=255)``: mIoU, fwIoU, mACC, pACC from a confusion matrix.
  Predictions: ``(H, W)`` label maps; targets: records or ``(H, W)`` label maps with ``ignore_label``.
- ``build_evaluator(task, label_info)``: the evaluator of a task, for a dataset's labels.

What is evaluated (a model on a dataset, or prediction files) is ``training/evaluate.py``; these are the metrics.
Bad input (a prediction of another size than its ground truth, ids missing from segments_info, unknown labels)
raises ``ValueError`` naming the image id.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..utils.optional import require
from .data import LabelInfo, semantic_label_map


def _require_pycocotools():
    return (
        require("pycocotools.mask", "mask AP"),
        require("pycocotools.coco", "mask AP").COCO,
        require("pycocotools.cocoeval", "mask AP").COCOeval,
    )


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _gather(objects: Any) -> list[Any]:
    """``[objects of every process]`` (just ``[objects]`` outside ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, objects)
            return gathered
    return [objects]


def _target_fields(target: dict[str, Any]) -> tuple[np.ndarray, list[int], list[int], list[bool], str]:
    return (
        _to_numpy(target["segment_map"]).astype(np.int64),
        [int(value) for value in target["segment_ids"]],
        [int(value) for value in target["class_labels"]],
        [bool(value) for value in target["iscrowd"]],
        str(target.get("image_id", "")),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Panoptic quality
# ---------------------------------------------------------------------------------------------------------------------


def panoptic_image_statistics(
    target_map: np.ndarray,
    target_segments: Sequence[tuple[int, int, bool]],
    prediction_map: np.ndarray,
    prediction_segments: Sequence[tuple[int, int]],
    num_labels: int,
    image_id: str = "",
) -> np.ndarray:
    """panopticapi's per-image matching -> ``(4, num_labels)`` float64: true positives, false positives, false
    negatives, sum of matched IoUs per class.

    Args:
        target_map: ``(H, W)`` ground-truth segment ids, 0 = void.
        target_segments: ``(segment id, label, iscrowd)`` of the ground-truth segments.
        prediction_map: ``(H, W)`` predicted segment ids; ids ``<= 0`` not in ``prediction_segments`` = no segment.
        prediction_segments: ``(segment id, label)`` of the predicted segments.
    """
    if target_map.shape != prediction_map.shape:
        raise ValueError(
            f"image {image_id!r}: prediction is {prediction_map.shape[1]}x{prediction_map.shape[0]}, ground truth "
            f"{target_map.shape[1]}x{target_map.shape[0]}"
        )
    statistics = np.zeros((4, num_labels), dtype=np.float64)
    gt_info = {int(segment_id): (int(label), bool(crowd)) for segment_id, label, crowd in target_segments}
    pred_info = {int(segment_id): int(label) for segment_id, label in prediction_segments}
    if len(pred_info) != len(prediction_segments):
        raise ValueError(f"image {image_id!r}: repeated segment ids in the prediction's segments_info")
    for segment_id, label in [(s, lab) for s, (lab, _) in gt_info.items()] + list(pred_info.items()):
        if not 0 <= label < num_labels:
            raise ValueError(f"image {image_id!r}: segment {segment_id} has label {label}, not in 0..{num_labels - 1}")
    if 0 in gt_info:
        raise ValueError(f"image {image_id!r}: ground-truth segment id 0 is reserved for void")
    # one pass over the pixels: (H, W) x 2 -> unique (ground-truth id, predicted id) pairs with pixel counts
    target = target_map.astype(np.int64).ravel()
    prediction = prediction_map.astype(np.int64).ravel()
    if target.size and target.min() < 0:
        raise ValueError(f"image {image_id!r}: negative ground-truth segment ids")
    prediction_min = int(prediction.min()) if prediction.size else 0
    prediction_span = (int(prediction.max()) - prediction_min + 1) if prediction.size else 1
    pair_keys, pair_counts = np.unique(target * prediction_span + (prediction - prediction_min), return_counts=True)

    gt_area: dict[int, int] = defaultdict(int)
    pred_area: dict[int | None, int] = defaultdict(int)  # key None: pixels of no predicted segment
    intersections: dict[tuple[int, int | None], int] = defaultdict(int)
    unlisted_predicted, unlisted_ground_truth = set(), set()
    for key, count in zip(pair_keys.tolist(), pair_counts.tolist()):
        gt_id, pred_id = divmod(key, prediction_span)
        pred_id += prediction_min
        if pred_id not in pred_info:
            # unlisted ids <= 0 are "no segment" (a listed id, even 0, is a segment); unlisted positive ids: an error
            if pred_id > 0:
                unlisted_predicted.add(pred_id)
            pred_id = None
        if gt_id != 0 and gt_id not in gt_info:
            unlisted_ground_truth.add(gt_id)
        gt_area[gt_id] += count
        pred_area[pred_id] += count
        intersections[gt_id, pred_id] += count
    if unlisted_predicted:
        raise ValueError(
            f"image {image_id!r}: predicted segment ids {sorted(unlisted_predicted)} are in the map but not in "
            "segments_info"
        )
    if unlisted_ground_truth:
        raise ValueError(
            f"image {image_id!r}: ground-truth segment ids {sorted(unlisted_ground_truth)} are in the map but not "
            "listed"
        )

    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), intersection in intersections.items():
        if gt_id == 0 or pred_id is None:
            continue
        gt_label, gt_crowd = gt_info[gt_id]
        if gt_crowd or pred_info[pred_id] != gt_label:
            continue
        # pixels of the prediction on ground-truth void are left out of the union
        union = pred_area[pred_id] + gt_area[gt_id] - intersection - intersections.get((0, pred_id), 0)
        iou = intersection / union
        if iou > 0.5:  # at most one match per segment: segments do not overlap
            statistics[0, gt_label] += 1
            statistics[3, gt_label] += iou
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)
    crowd_ids_by_label: dict[int, list[int]] = defaultdict(list)
    for gt_id, (gt_label, gt_crowd) in gt_info.items():
        if gt_id in gt_matched or gt_id not in gt_area:
            continue
        if gt_crowd:
            crowd_ids_by_label[gt_label].append(gt_id)
        else:
            statistics[2, gt_label] += 1
    for pred_id, pred_label in pred_info.items():
        if pred_id in pred_matched or pred_id not in pred_area:
            continue  # a listed segment without pixels covers nothing: it is neither matched nor counted
        # an unmatched prediction mostly on void or on a crowd region of its class is not a false positive
        ignored = intersections.get((0, pred_id), 0) + sum(
            intersections.get((crowd_id, pred_id), 0) for crowd_id in crowd_ids_by_label.get(pred_label, [])
        )
        if ignored / pred_area[pred_id] > 0.5:
            continue
        statistics[1, pred_label] += 1
    return statistics


class PanopticEvaluator:
    """Panoptic quality (PQ = SQ x RQ) for all classes, things and stuff, as panopticapi computes it.

    Args:
        num_labels: number of classes (label ids 0..num_labels-1).
        thing_ids: label ids of thing classes; the others are stuff.
    """

    def __init__(self, num_labels: int, thing_ids: Iterable[int]):
        self.num_labels = num_labels
        self.thing_ids = sorted(set(thing_ids))
        self.reset()

    @classmethod
    def from_label_info(cls, label_info: LabelInfo) -> PanopticEvaluator:
        return cls(label_info.num_labels, label_info.thing_ids)

    def reset(self) -> None:
        self.statistics = np.zeros((4, self.num_labels), dtype=np.float64)  # tp, fp, fn, iou sum per class
        self.num_images = 0

    def update(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        """Add a batch: ``predictions[i]`` (``segmentation`` + ``segments_info`` with ``id`` and ``label_id``)
        against ``targets[i]`` (a record)."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            target_map, segment_ids, labels, crowd, image_id = _target_fields(target)
            prediction_segments = [
                (int(info["id"]), int(info.get("label_id", info.get("category_id", -1))))
                for info in prediction["segments_info"]
            ]
            self.statistics += panoptic_image_statistics(
                target_map,
                list(zip(segment_ids, labels, crowd)),
                _to_numpy(prediction["segmentation"]).astype(np.int64),
                prediction_segments,
                self.num_labels,
                image_id,
            )
            self.num_images += 1

    def compute(self) -> dict[str, float]:
        """``PQ``, ``SQ``, ``RQ`` and their ``_th`` / ``_st`` versions, in percent, over the classes that occur."""
        statistics = sum(_gather(self.statistics))
        true_positives, false_positives, false_negatives, iou_sums = statistics
        counted = (true_positives + false_positives + false_negatives) > 0
        denominator = np.maximum(true_positives + 0.5 * false_positives + 0.5 * false_negatives, 1e-12)
        pq = iou_sums / denominator
        sq = np.where(true_positives > 0, iou_sums / np.maximum(true_positives, 1), 0.0)
        rq = true_positives / denominator
        is_thing = np.zeros(self.num_labels, dtype=bool)
        is_thing[self.thing_ids] = True
        results = {}
        for suffix, selection in (("", np.ones_like(is_thing)), ("_th", is_thing), ("_st", ~is_thing)):
            classes = counted & selection
            count = int(classes.sum())
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                results[f"{name}{suffix}"] = float(100 * values[classes].sum() / count) if count else 0.0
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Mask AP
# ---------------------------------------------------------------------------------------------------------------------


def _encode(mask: np.ndarray) -> dict[str, Any]:
    """``(H, W)`` bool -> compressed RLE with ``counts`` as str (JSON- and pickle-friendly)."""
    mask_utils, _, _ = _require_pycocotools()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _decodable(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


class InstanceEvaluator:
    """COCO mask AP (``COCOeval``, ``iouType="segm"``) from per-batch updates that keep only RLEs.

    Args:
        thing_ids: label ids evaluated (ground truth and predictions of other labels are left out); ``None``: all.
        ground_truth: optional COCO instances JSON (path or dict). When given, targets are not needed in ``update``
            (pass ``image_ids``) and predictions' labels are mapped to its category ids by ``label_to_category_id``
            (default: the label is the category id).
        max_detections: detections per image kept, best scores first (COCO: 100).
    """

    def __init__(
        self,
        thing_ids: Iterable[int] | None = None,
        ground_truth: str | os.PathLike | dict | None = None,
        label_to_category_id: dict[int, int] | None = None,
        max_detections: int = 100,
    ):
        _require_pycocotools()
        self.thing_ids = set(thing_ids) if thing_ids is not None else None
        self.ground_truth = ground_truth
        self.label_to_category_id = label_to_category_id
        self.max_detections = max_detections
        self.reset()

    def reset(self) -> None:
        self.detections: list[dict[str, Any]] = []  # image_id (str), category_id, segmentation RLE, score
        self.gt_images: dict[str, tuple[int, int]] = {}  # image_id -> (height, width)
        self.gt_annotations: list[dict[str, Any]] = []

    def _category(self, label: int) -> int:
        return self.label_to_category_id[label] if self.label_to_category_id is not None else label

    def add_detections(self, image_id: str, rles: Sequence[dict], labels: Sequence[int], scores: Sequence[float]):
        """Add one image's detections (compressed RLEs, label ids, scores); keeps the ``max_detections`` best."""
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[: self.max_detections]
        for index in order:
            label = int(labels[index])
            if self.thing_ids is not None and label not in self.thing_ids:
                continue
            rle = dict(rles[index])
            if isinstance(rle["counts"], bytes):
                rle["counts"] = rle["counts"].decode("ascii")
            self.detections.append(
                {
                    "image_id": str(image_id),
                    "category_id": self._category(label),
                    "segmentation": rle,
                    "score": float(scores[index]),
                }
            )

    def _prediction_rles(self, prediction: dict[str, Any], image_id: str):
        if "rles" in prediction:
            return prediction["rles"], list(prediction["labels"]), list(prediction["scores"])
        infos = prediction["segments_info"]
        labels = [int(info["label_id"]) for info in infos]
        scores = [float(info.get("score", 1.0)) for info in infos]
        if isinstance(prediction["segmentation"], (list, tuple)):  # return_coco_annotation: RLEs, in segments order
            if len(prediction["segmentation"]) != len(infos):
                raise ValueError(
                    f"image {image_id!r}: {len(prediction['segmentation'])} RLEs for {len(infos)} segments"
                )
            return list(prediction["segmentation"]), labels, scores
        segmentation = _to_numpy(prediction["segmentation"])
        if segmentation.ndim == 3:  # (N, H, W) binary maps, in segments_info order
            if segmentation.shape[0] != len(infos):
                raise ValueError(f"image {image_id!r}: {segmentation.shape[0]} binary maps for {len(infos)} segments")
            return [_encode(mask > 0) for mask in segmentation], labels, scores
        return [_encode(segmentation == int(info["id"])) for info in infos], labels, scores

    def update(
        self,
        predictions: Sequence[dict[str, Any]],
        targets: Sequence[dict[str, Any]] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        """Add a batch of predictions and (unless a ground-truth JSON was given) their target records."""
        if targets is None and self.ground_truth is None:
            raise ValueError("InstanceEvaluator.update needs targets unless ground_truth= was given")
        if image_ids is None:
            if targets is None:
                raise ValueError("pass image_ids (or targets) to InstanceEvaluator.update")
            image_ids = [str(target.get("image_id", "")) for target in targets]
        for index, (prediction, image_id) in enumerate(zip(predictions, image_ids)):
            if targets is not None and self.ground_truth is None:
                self._add_ground_truth(targets[index])
            self.add_detections(str(image_id), *self._prediction_rles(prediction, str(image_id)))

    def _add_ground_truth(self, target: dict[str, Any]) -> None:
        segment_map, segment_ids, labels, crowd, image_id = _target_fields(target)
        if image_id in self.gt_images:
            raise ValueError(f"image id {image_id!r} was evaluated twice")
        self.gt_images[image_id] = segment_map.shape
        for segment_id, label, is_crowd in zip(segment_ids, labels, crowd):
            if self.thing_ids is not None and label not in self.thing_ids:
                continue
            mask = segment_map == segment_id
            if not mask.any():
                continue
            self.gt_annotations.append(
                {"image_id": image_id, "category_id": label, "segmentation": _encode(mask), "iscrowd": int(is_crowd)}
            )

    def _ground_truth_coco(self, gt_images, gt_annotations):
        mask_utils, COCO, _ = _require_pycocotools()
        coco = COCO()
        if self.ground_truth is not None:
            if isinstance(self.ground_truth, dict):
                coco.dataset = self.ground_truth
            else:
                with open(self.ground_truth) as handle:
                    coco.dataset = json.load(handle)
            if self.thing_ids is not None:
                wanted = {self._category(label) for label in self.thing_ids}
                coco.dataset = {
                    **coco.dataset,
                    "annotations": [a for a in coco.dataset["annotations"] if a["category_id"] in wanted],
                    "categories": [c for c in coco.dataset["categories"] if c["id"] in wanted],
                }
            if any(annotation["id"] == 0 for annotation in coco.dataset["annotations"]):
                # COCOeval records "matched to ground truth 0" as "unmatched": annotation ids must start at 1
                coco.dataset["annotations"] = [
                    {**annotation, "id": number} for number, annotation in enumerate(coco.dataset["annotations"], 1)
                ]
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            return coco, {str(image_id): image_id for image_id in coco.getImgIds()}
        image_numbers = {image_id: number for number, image_id in enumerate(sorted(gt_images), start=1)}
        annotations = []
        for number, annotation in enumerate(gt_annotations, start=1):
            rle = _decodable(annotation["segmentation"])
            annotations.append(
                {
                    **annotation,
                    "id": number,
                    "image_id": image_numbers[annotation["image_id"]],
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                }
            )
        categories = sorted({a["category_id"] for a in gt_annotations} | {d["category_id"] for d in self.detections})
        coco.dataset = {
            "images": [
                {"id": number, "height": gt_images[image_id][0], "width": gt_images[image_id][1]}
                for image_id, number in image_numbers.items()
            ],
            "annotations": annotations,
            "categories": [{"id": category} for category in categories],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco, image_numbers

    def compute(self) -> dict[str, float]:
        """``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` in percent (``COCOeval`` segm, gathered once)."""
        _, _, COCOeval = _require_pycocotools()
        gathered = _gather((self.detections, self.gt_images, self.gt_annotations))
        detections = [d for part in gathered for d in part[0]]
        gt_images = {key: value for part in gathered for key, value in part[1].items()}
        gt_annotations = [a for part in gathered for a in part[2]]
        coco_gt, image_numbers = self._ground_truth_coco(gt_images, gt_annotations)
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        results_list = []
        for detection in detections:
            if detection["image_id"] not in image_numbers:
                raise ValueError(f"detection for image id {detection['image_id']!r}, absent from the ground truth")
            results_list.append(
                {
                    **detection,
                    "image_id": image_numbers[detection["image_id"]],
                    "segmentation": _decodable(detection["segmentation"]),
                }
            )
        if not coco_gt.getAnnIds():
            return dict.fromkeys(names, float("nan"))
        if not results_list:
            return dict.fromkeys(names, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            coco_dt = coco_gt.loadRes(results_list)
            evaluation = COCOeval(coco_gt, coco_dt, iouType="segm")
            if self.ground_truth is None:
                evaluation.params.imgIds = sorted(image_numbers.values())
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        # COCOeval reports -1 where a size range has no ground truth: that is "undefined" (NaN), not a score
        return {
            name: float(100 * value) if value >= 0 else float("nan") for name, value in zip(names, evaluation.stats)
        }


# ---------------------------------------------------------------------------------------------------------------------
# mIoU
# ---------------------------------------------------------------------------------------------------------------------


class SemanticEvaluator:
    """mIoU, frequency-weighted IoU, mean class accuracy and pixel accuracy from a confusion matrix.

    Classes are averaged over those present in the ground truth (as detectron2's SemSegEvaluator does). Pixels whose
    ground truth is ``ignore_label`` are left out; a predicted ``ignore_label`` (or any value outside the labels) on
    a labelled pixel counts as a miss.

    Args:
        num_labels: number of classes (label ids 0..num_labels-1).
        ignore_label: ground-truth value of unlabeled pixels.
    """

    def __init__(self, num_labels: int, ignore_label: int = 255):
        self.num_labels = num_labels
        self.ignore_label = ignore_label
        self.reset()

    def reset(self) -> None:
        # rows: ground truth, columns: prediction; the last column collects predictions that are no class
        self.confusion = np.zeros((self.num_labels, self.num_labels + 1), dtype=np.int64)

    def update(self, predictions: Sequence[Any], targets: Sequence[Any]) -> None:
        """Add a batch of ``(H, W)`` predicted label maps against targets (records or ``(H, W)`` label maps)."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            image_id = ""
            if isinstance(target, dict):
                image_id = str(target.get("image_id", ""))
                target = semantic_label_map(
                    {**target, "segment_map": _to_numpy(target["segment_map"])}, self.ignore_label
                )
            target = _to_numpy(target).astype(np.int64)
            prediction = _to_numpy(prediction).astype(np.int64)
            if prediction.shape != target.shape:
                raise ValueError(
                    f"image {image_id!r}: prediction shape {prediction.shape}, ground truth {target.shape}"
                )
            valid = target != self.ignore_label
            if (target[valid] < 0).any() or (target[valid] >= self.num_labels).any():
                raise ValueError(f"image {image_id!r}: ground-truth labels outside 0..{self.num_labels - 1}")
            predicted = prediction[valid]
            predicted = np.where((predicted >= 0) & (predicted < self.num_labels), predicted, self.num_labels)
            self.confusion += np.bincount(
                target[valid] * (self.num_labels + 1) + predicted, minlength=self.num_labels * (self.num_labels + 1)
            ).reshape(self.num_labels, self.num_labels + 1)

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``fwIoU``, ``mACC``, ``pACC`` in percent."""
        confusion = sum(_gather(self.confusion)).astype(np.float64)
        true_positives = np.diagonal(confusion[:, : self.num_labels])
        gt_pixels = confusion.sum(axis=1)
        predicted_pixels = confusion[:, : self.num_labels].sum(axis=0)
        present = gt_pixels > 0
        if not present.any():
            return {"mIoU": 0.0, "fwIoU": 0.0, "mACC": 0.0, "pACC": 0.0}
        union = gt_pixels + predicted_pixels - true_positives
        iou = true_positives[present] / union[present]
        accuracy = true_positives[present] / gt_pixels[present]
        frequency = gt_pixels[present] / gt_pixels.sum()
        return {
            "mIoU": float(100 * iou.mean()),
            "fwIoU": float(100 * (frequency * iou).sum()),
            "mACC": float(100 * accuracy.mean()),
            "pACC": float(100 * true_positives.sum() / gt_pixels.sum()),
        }


def build_evaluator(task: str, label_info: LabelInfo, instance_ground_truth: str | os.PathLike | None = None):
    """The benchmark evaluator of ``task`` (``"panoptic"``, ``"instance"``, ``"semantic"``) for a dataset's labels.

    ``instance_ground_truth``: a COCO instances JSON to score instance predictions against (exact where instances
    overlap, which a record's segment map cannot hold); by default the targets' thing segments are the ground truth.
    """
    if task == "panoptic":
        return PanopticEvaluator.from_label_info(label_info)
    if task == "instance":
        if instance_ground_truth is not None:
            return InstanceEvaluator(
                label_info.thing_ids,
                ground_truth=instance_ground_truth,
                label_to_category_id=label_info.category_ids,
            )
        return InstanceEvaluator(label_info.thing_ids)
    if task == "semantic":
        return SemanticEvaluator(label_info.num_labels, label_info.ignore_label)
    raise ValueError(f"unknown task {task!r}; use 'panoptic', 'instance' or 'semantic'")
