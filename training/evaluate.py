"""Evaluation: a model on a dataset (the training loop and the demo), or prediction files (``mask2former evaluate``).

API
---
- ``EvaluationSet(dataset, collate_fn, task, label_info)``: what is evaluated.
- ``segment_dataset(model, processor, evaluation, batch_size=...)``: run a model over the records (sharded over the
  processes of an ``accelerator``, or in one process) and post-process them with the one task dispatch,
  :func:`mask2former.processing.tasks.post_process`; yields ``(indices, targets, predictions)`` per batch.
- ``evaluate_model(...)``: the same, scored by the task's benchmark evaluator (``training/metrics.py``), gathered
  across processes once -> ``dict[str, float]`` in percent.
- ``evaluate_panoptic_files``, ``evaluate_instance_files``, ``evaluate_semantic_files``: score prediction files in the
  datasets' own formats through the same evaluators. Bad input raises ``ValueError`` naming the file and image, or is
  skipped and counted (``on_bad_input="skip"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..processing.image_io import read_label_image
from ..processing.tasks import post_process
from .data import LabelInfo, load_dataset_for_segmentation, rgb_to_id
from .metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator, build_evaluator

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# A model on a dataset
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationSet:
    """What a model is evaluated on.

    Args:
        dataset: map-style records (``training/data/records.py``).
        collate_fn: records -> model inputs + ``"targets"`` (``SegmentationCollator(keep_targets=True)``).
        task: ``"panoptic"``, ``"instance"`` (COCO RLEs) or ``"semantic"``.
        label_info: the dataset's labels (panoptic fuses its stuff classes, as the paper's inference does).
        instance_ground_truth: a COCO instances JSON to score instances against (exact where they overlap).
    """

    dataset: Any
    collate_fn: Any
    task: str
    label_info: LabelInfo
    instance_ground_truth: str | os.PathLike | None = None


def segment_dataset(
    model: torch.nn.Module,
    processor: Any,
    evaluation: EvaluationSet,
    *,
    batch_size: int,
    inference: dict[str, float] | None = None,
    accelerator: Any = None,
    indices: Sequence[int] | None = None,
    show_progress: bool = True,
) -> Iterator[tuple[list[int], list[dict[str, Any]], list[Any]]]:
    """Segment the records of ``evaluation`` with ``model`` in eval mode, batch by batch, at the images' own sizes.

    Args:
        model: the model (with an ``accelerator``: what it prepared or unwrapped).
        processor: the image processor whose post-processing turns outputs into results.
        evaluation: the records, their collator, the task and the labels.
        batch_size: images per forward pass.
        inference: post-processing thresholds over ``INFERENCE_DEFAULTS[task]``.
        accelerator: shards the images over its processes and runs under its autocast; None: one process, the
            model's device.
        indices: the records to segment (default: all).
        show_progress: a progress bar on the (local) main process.

    Yields:
        ``(indices, targets, predictions)`` of each batch.
    """
    dataset, task = evaluation.dataset, evaluation.task
    indices = list(range(len(dataset)) if indices is None else indices)
    if accelerator is not None:
        indices = indices[accelerator.process_index :: accelerator.num_processes]
        device, autocast = accelerator.device, accelerator.autocast
        show_progress = show_progress and accelerator.is_local_main_process
    else:
        device, autocast = next(model.parameters()).device, contextlib.nullcontext
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for batch_indices in tqdm(batches, desc="evaluate", disable=not show_progress, leave=False):
            batch = evaluation.collate_fn([dataset[index] for index in batch_indices])
            for reason in batch.pop("skipped", []):  # bad examples are left out of the evaluation, not scored
                logger.warning("evaluation skipped a bad example: %s", reason)
            if "targets" not in batch:  # every example of the batch was bad
                continue
            targets = batch.pop("targets")
            target_sizes = [tuple(target["segment_map"].shape[-2:]) for target in targets]
            with torch.no_grad(), autocast():
                outputs = model(
                    pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device)
                )
            predictions = post_process(
                processor,
                outputs,
                task,
                target_sizes,
                pixel_mask=batch["pixel_mask"],
                inference=inference,
                label_ids_to_fuse=evaluation.label_info.stuff_ids,
            )
            yield batch_indices, targets, predictions
    finally:
        model.train(was_training)


def evaluate_model(
    model: torch.nn.Module, processor: Any, evaluation: EvaluationSet, **options: Any
) -> dict[str, float]:
    """Segment ``evaluation`` with `segment_dataset` (``options``: its ``batch_size``, ``inference``, ``accelerator``,
    ``show_progress``) and score it with the task's benchmark metric.

    Each process feeds its share of the images to the evaluator of ``training/metrics.py``, which gathers across
    processes once at the end.

    Returns:
        `dict[str, float]`: PQ / SQ / RQ, mask AP or mIoU (and their variants), in percent.
    """
    evaluator = build_evaluator(
        evaluation.task, evaluation.label_info, instance_ground_truth=evaluation.instance_ground_truth
    )
    for _, targets, predictions in segment_dataset(model, processor, evaluation, **options):
        evaluator.update(predictions, targets)
    return evaluator.compute()


# ---------------------------------------------------------------------------------------------------------------------
# Prediction files in the datasets' own formats (the `mask2former evaluate` command)
# ---------------------------------------------------------------------------------------------------------------------


def _progress(iterable, total: int | None, description: str):
    return tqdm(iterable, total=total, desc=description, leave=False)


class _Skips:
    def __init__(self, on_bad_input: str):
        if on_bad_input not in ("raise", "skip"):
            raise ValueError(f"on_bad_input must be 'raise' or 'skip', got {on_bad_input!r}")
        self.on_bad_input = on_bad_input
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        if self.on_bad_input == "raise":
            raise ValueError(message + " (use --skip-bad-input / on_bad_input='skip' to skip such images)")
        self.messages.append(message)


def _read_png(path: Path, what: str) -> np.ndarray:
    return np.asarray(read_label_image(path, what=what))  # ImageReadError (a ValueError) names the file


def evaluate_panoptic_files(
    ground_truth_root: str | os.PathLike,
    split: str,
    predictions_json: str | os.PathLike,
    predictions_dir: str | os.PathLike | None = None,
    on_bad_input: str = "raise",
) -> dict[str, float]:
    """COCO panoptic predictions (JSON + PNG folder; by panopticapi's convention the folder is the JSON path without
    ``.json``) against a COCO panoptic root. Category ids are the dataset's own. Returns PQ metrics (+ skip count)."""
    predictions_json = Path(predictions_json)
    predictions_dir = Path(predictions_dir) if predictions_dir else predictions_json.with_suffix("")
    with open(predictions_json) as handle:
        predicted = json.load(handle)
    annotations = predicted["annotations"] if isinstance(predicted, dict) else predicted
    by_image = {str(annotation["image_id"]): annotation for annotation in annotations}
    data = load_dataset_for_segmentation(ground_truth_root, split, "panoptic", on_bad_input=on_bad_input)
    dataset, label_info = data.dataset, data.label_info
    category_to_label = label_info.category_to_label
    evaluator = PanopticEvaluator.from_label_info(label_info)
    skips = _Skips(on_bad_input)
    for target in _progress(dataset, len(dataset), "panoptic"):
        image_id = target["image_id"]
        if target.get("skipped"):
            skips.messages.append("a ground-truth example (see the log)")
            continue
        annotation = by_image.get(image_id)
        if annotation is None:
            skips(f"{predictions_json}: no prediction for image id {image_id}")
            continue
        png_path = predictions_dir / annotation.get("file_name", f"{Path(target['file_name']).stem}.png")
        try:
            prediction_map = rgb_to_id(_read_png(png_path, "prediction PNG")[..., :3])
            infos = []
            for info in annotation["segments_info"]:
                if info["category_id"] not in category_to_label:
                    raise ValueError(
                        f"{predictions_json}: image id {image_id} segment {info['id']} has unknown category id "
                        f"{info['category_id']}"
                    )
                infos.append({"id": info["id"], "label_id": category_to_label[info["category_id"]]})
            evaluator.update([{"segmentation": prediction_map, "segments_info": infos}], [target])
        except ValueError as error:
            skips(f"{png_path}: {error}" if str(png_path) not in str(error) else str(error))
    return {**evaluator.compute(), "num_images": float(evaluator.num_images), "skipped": float(len(skips.messages))}


def evaluate_instance_files(
    ground_truth_root: str | os.PathLike, split: str, predictions_json: str | os.PathLike, on_bad_input: str = "raise"
) -> dict[str, float]:
    """A COCO results JSON (``[{image_id, category_id, segmentation: RLE, score}]``) against
    ``annotations/instances_<split>.json`` of a COCO root, or, when the root has only panoptic annotations (e.g.
    ``synthetic-shapes``), against the thing segments of those. Returns mask AP metrics (+ skip count)."""
    root = Path(ground_truth_root)
    split_name = split if (root / split).is_dir() or split.endswith(("2017", "2014")) else f"{split}2017"
    gt_path = root / "annotations" / f"instances_{split_name}.json"
    with open(predictions_json) as handle:
        results = json.load(handle)
    if not isinstance(results, list):
        raise ValueError(f"{predictions_json}: a COCO results file is a JSON list of detections")
    if gt_path.is_file():
        with open(gt_path) as handle:
            ground_truth = json.load(handle)
        image_ids = {image["id"] for image in ground_truth["images"]}
        category_ids = {category["id"] for category in ground_truth["categories"]}
        evaluator = InstanceEvaluator(ground_truth=ground_truth, max_detections=10**9)
    elif (root / "annotations" / f"panoptic_{split_name}.json").is_file():
        data = load_dataset_for_segmentation(root, split, "panoptic", on_bad_input=on_bad_input)
        dataset, label_info = data.dataset, data.label_info
        # ground truth as the thing segments of the panoptic records, in the dataset's own category ids
        evaluator = InstanceEvaluator(
            [label_info.category_ids[label] for label in label_info.thing_ids], max_detections=10**9
        )
        image_ids = set()
        for target in _progress(dataset, len(dataset), "ground truth"):
            if target.get("skipped"):
                continue
            image_ids.add(int(target["image_id"]) if target["image_id"].isdigit() else target["image_id"])
            categories = [label_info.category_ids[label] for label in target["class_labels"]]
            evaluator._add_ground_truth({**target, "class_labels": categories})
        category_ids = set(label_info.category_ids.values())
    else:
        raise ValueError(f"no instance ground truth {gt_path} (nor a panoptic JSON beside it)")
    skips = _Skips(on_bad_input)
    for index, result in enumerate(results):
        problem = None
        if result.get("image_id") not in image_ids:
            problem = f"unknown image id {result.get('image_id')!r}"
        elif result.get("category_id") not in category_ids:
            problem = f"unknown category id {result.get('category_id')!r} (image id {result['image_id']})"
        elif not isinstance(result.get("segmentation"), dict) or "counts" not in result["segmentation"]:
            problem = f"detection of image id {result['image_id']} has no RLE segmentation"
        if problem:
            skips(f"{predictions_json}: detection {index}: {problem}")
            continue
        if evaluator.thing_ids is not None and result["category_id"] not in evaluator.thing_ids:
            continue  # a stuff class: not part of instance segmentation
        evaluator.detections.append(
            {
                "image_id": str(result["image_id"]),
                "category_id": result["category_id"],
                "segmentation": result["segmentation"],
                "score": float(result.get("score", 1.0)),
            }
        )
    return {**evaluator.compute(), "skipped": float(len(skips.messages))}


def evaluate_semantic_files(
    ground_truth_root: str | os.PathLike, split: str, predictions_dir: str | os.PathLike, on_bad_input: str = "raise"
) -> dict[str, float]:
    """Semantic PNGs (one per image, named after the image, holding the dataset's category ids: ADE20K 1..150,
    COCO its panoptic category ids; 0 = no class) against an ADE20K or COCO panoptic root."""
    predictions_dir = Path(predictions_dir)
    data = load_dataset_for_segmentation(ground_truth_root, split, "semantic", on_bad_input=on_bad_input)
    dataset, label_info = data.dataset, data.label_info
    # category value -> label, every other value -> "no class"
    lookup = np.full(max(label_info.category_ids.values()) + 2, label_info.num_labels, dtype=np.int64)
    for label, category in label_info.category_ids.items():
        lookup[category] = label
    evaluator = SemanticEvaluator(label_info.num_labels, label_info.ignore_label)
    skips = _Skips(on_bad_input)
    for target in _progress(dataset, len(dataset), "semantic"):
        if target.get("skipped"):
            skips.messages.append("a ground-truth example (see the log)")
            continue
        png_path = predictions_dir / f"{Path(target['file_name']).stem}.png"
        try:
            if not png_path.is_file():
                raise ValueError(f"missing prediction {str(png_path)!r} for image id {target['image_id']}")
            values = _read_png(png_path, "prediction PNG").astype(np.int64)
            if values.ndim == 3:
                values = values[..., 0]
            prediction = lookup[np.clip(values, 0, len(lookup) - 1)]
            evaluator.update([prediction], [target])
        except ValueError as error:
            skips(f"{png_path}: {error}" if str(png_path) not in str(error) else str(error))
    return {**evaluator.compute(), "skipped": float(len(skips.messages))}
