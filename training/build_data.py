"""Training data for the loop: the datasets, their labels, the augmentation and the collators of one run.

``build_data(settings, processor) -> TrainingData`` is what the trainer and the demo call; the rest is its help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .train import TrainSettings


@dataclass
class TrainingData:
    """What the loop needs from the data side (training/datasets.py, transforms.py, collate.py)."""

    train_dataset: Any  # map-style: index -> augmented record
    eval_dataset: Any  # map-style: index -> record (no augmentation)
    label_info: Any  # datasets.LabelInfo
    collate_fn: Any  # records -> model inputs
    eval_collate_fn: Any  # records -> model inputs + "targets"
    instance_ground_truth: str | None = None  # COCO instances JSON of the evaluated split (exact overlapping masks)


class AugmentedRecords(torch.utils.data.Dataset):
    """Records of a `datasets.Dataset` passed through an augmentation (``record -> record``), decoded lazily."""

    def __init__(self, dataset: Any, transform: Any = None, limit: int | None = None) -> None:
        self.dataset, self.transform = dataset, transform
        self.length = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.dataset[int(index)]
        return self.transform(record) if self.transform is not None else record


def build_augmentation(augmentation: dict[str, Any]):
    """The recipe's ``augmentation`` dict -> a ``record -> record`` callable (training/transforms.py)."""
    from . import transforms

    options = {key: value for key, value in augmentation.items() if key != "name"}
    name = augmentation.get("name", "none")
    if name == "flip":  # small images already at training size (synthetic-shapes): flips only
        return transforms.RandomHorizontalFlip(prob=options.get("flip_prob", 0.5))
    return transforms.build_train_transform(name, **options)


def _dataset_kwargs(settings: TrainSettings, source: str) -> dict[str, Any]:
    """Where the data comes from: synthetic-shapes is generated (once, cached) with the recipe's sizes."""
    if source != "synthetic-shapes":
        return {"source": source}
    from .synthetic import generate_synthetic_shapes

    options = settings.dataset_options
    root = generate_synthetic_shapes(
        options.get("cache_dir"),
        seed=int(options.get("seed", 0)),
        num_images=int(options.get("num_train_images", 256)),
        num_val_images=int(options.get("num_eval_images", 32)),
        image_size=int(options.get("image_size", 128)),
    )
    return {"source": str(root)}


def build_data(settings: TrainSettings, processor: Any) -> TrainingData:
    """Load the training and evaluation sets, their labels, the augmentation and the collators."""
    from .collate import SegmentationCollator
    from .datasets import load_dataset_for_segmentation, segmentation_label_info

    train_source = _dataset_kwargs(settings, settings.dataset)["source"]
    train_split = settings.train_split or "train"
    eval_split = settings.eval_split or "val"
    if settings.dataset == "synthetic-shapes" or Path(train_source).is_dir():
        root = Path(train_source)
        # a local root with only a validation split (e.g. the COCO sample) trains on it
        if not any((root / "annotations").glob("*train*")) and not (root / "images" / "training").is_dir():
            train_split = settings.train_split or "val"
    train_records = load_dataset_for_segmentation(train_source, split=train_split, task=settings.task)
    eval_source = _dataset_kwargs(settings, settings.eval_dataset)["source"]
    eval_records = load_dataset_for_segmentation(eval_source, split=eval_split, task=settings.task)
    label_info = segmentation_label_info(train_records)
    instance_ground_truth = None
    eval_annotations = Path(eval_source) / "annotations"
    if settings.task == "instance" and settings.num_eval_images is None and eval_annotations.is_dir():
        # score against the JSON's overlapping instance masks, as COCO does (a record's segment map cannot hold them)
        candidates = sorted(eval_annotations.glob(f"instances_{eval_split}*.json"))
        instance_ground_truth = str(candidates[0]) if candidates else None
    thing_ids = label_info.thing_ids
    # The paper's augmentations already give fixed-size crops: the processor must not resize them again (its own
    # resizing, saved with the model, is the inference one and still applies to evaluation).
    train_processor_kwargs = (
        {"do_resize": False} if settings.augmentation.get("name") in ("coco_lsj", "ade20k") else {}
    )
    return TrainingData(
        train_dataset=AugmentedRecords(train_records, build_augmentation(settings.augmentation)),
        eval_dataset=AugmentedRecords(eval_records, None, settings.num_eval_images),
        label_info=label_info,
        collate_fn=SegmentationCollator(processor, task=settings.task, thing_ids=thing_ids, **train_processor_kwargs),
        eval_collate_fn=SegmentationCollator(processor, task=settings.task, thing_ids=thing_ids, keep_targets=True),
        instance_ground_truth=instance_ground_truth,
    )
