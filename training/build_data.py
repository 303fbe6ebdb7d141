"""Training data for the loop: the datasets, their labels, the augmentation and the collators of one run.

``build_data(settings, processor) -> TrainingData`` is what the trainer and the demo call; the rest is its help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .collate import SegmentationCollator
from .data import (
    SYNTHETIC_SOURCE,
    BadExampleError,
    LabelInfo,
    SegmentationRecord,
    lacks_split,
    load_dataset_for_segmentation,
)
from .transforms import build_train_transform

if TYPE_CHECKING:
    from .settings import TrainSettings

# a run of this many bad examples in a row is not bad luck but a broken dataset: stop
MAX_REPLACEMENT_TRIES = 16


@dataclass
class TrainingData:
    """What the loop needs from the data side (training/data/, transforms.py, collate.py)."""

    train_dataset: Any  # map-style: index -> augmented record
    eval_dataset: Any  # map-style: index -> record (no augmentation)
    label_info: LabelInfo
    collate_fn: Any  # records -> model inputs
    eval_collate_fn: Any  # records -> model inputs + "targets"
    instance_ground_truth: str | None = None  # COCO instances JSON of the evaluated split (exact overlapping masks)
    skipped: list[str] = field(default_factory=list)  # examples left out while listing the two sets (skip mode)


class AugmentedRecords(torch.utils.data.Dataset):
    """Records of a `datasets.Dataset` passed through an augmentation (``record -> record``), decoded lazily.

    With ``replace_skipped=True`` (training), the placeholder of an example skipped as bad input is replaced by the
    next good example, carrying the skipped ones' reasons in ``skip_reasons``: every batch keeps its size (so the
    processes of a distributed run stay in step and no batch is left empty) and the collator still reports them.
    Without it (evaluation) the placeholder is returned, and the collator leaves it out, so no image is scored twice.
    """

    def __init__(
        self, dataset: Any, transform: Any = None, limit: int | None = None, replace_skipped: bool = False
    ) -> None:
        self.dataset, self.transform, self.replace_skipped = dataset, transform, replace_skipped
        self.length = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SegmentationRecord:
        record = self.dataset[int(index)]
        if record["skipped"] and self.replace_skipped:
            record = self._replacement(int(index), record)
        return self.transform(record) if self.transform is not None and not record["skipped"] else record

    def _replacement(self, index: int, skipped: SegmentationRecord) -> SegmentationRecord:
        reasons = list(skipped["skip_reasons"])
        for offset in range(1, min(self.length, MAX_REPLACEMENT_TRIES + 1)):
            candidate = self.dataset[(index + offset) % self.length]
            if not candidate["skipped"]:
                return {**candidate, "skip_reasons": reasons}
            reasons.extend(candidate["skip_reasons"])
        raise BadExampleError(
            f"{len(reasons)} examples in a row from index {index} are bad input, the first: {reasons[0]}; fix the "
            "data (or check that it is the dataset you meant)"
        )


def build_augmentation(augmentation: dict[str, Any]):
    """The recipe's ``augmentation`` dict -> a ``record -> record`` callable (training/transforms.py)."""
    options = {key: value for key, value in augmentation.items() if key != "name"}
    return build_train_transform(augmentation.get("name", "none"), **options)


def _source_options(settings: TrainSettings, source: str) -> dict[str, Any]:
    """The loader's options for ``source``: synthetic-shapes is generated (once, cached) with the recipe's sizes."""
    if source != SYNTHETIC_SOURCE:
        return {}
    options = settings.dataset_options
    return {
        "cache_dir": options.get("cache_dir"),
        "seed": int(options.get("seed", 0)),
        "num_images": int(options.get("num_train_images", 256)),
        "num_val_images": int(options.get("num_eval_images", 32)),
        "image_size": int(options.get("image_size", 128)),
    }


def build_data(settings: TrainSettings, processor: Any) -> TrainingData:
    """Load the training and evaluation sets, their labels, the augmentation and the collators.

    With ``settings.on_bad_input == "skip"`` (the default) a bad example does not stop the run: one found while
    listing a set is left out (``TrainingData.skipped``); one found when read is replaced in training by the next good
    example and left out of evaluation, its reason travelling in the batch (``batch["skipped"]``) to the loop's log.
    """
    on_bad_input = settings.on_bad_input
    # a local root with only a validation split (e.g. the COCO sample) trains on it
    train_split = settings.train_split or ("val" if lacks_split(settings.dataset, "train") else "train")
    eval_split = settings.eval_split or "val"
    train = load_dataset_for_segmentation(
        settings.dataset,
        train_split,
        settings.task,
        on_bad_input=on_bad_input,
        **_source_options(settings, settings.dataset),
    )
    evaluation = load_dataset_for_segmentation(
        settings.eval_dataset,
        eval_split,
        settings.task,
        on_bad_input=on_bad_input,
        **_source_options(settings, settings.eval_dataset),
    )
    label_info = train.label_info
    instance_ground_truth = None
    if settings.task == "instance" and settings.num_eval_images is None and evaluation.instance_annotations:
        # score against the JSON's overlapping instance masks, as COCO does (a record's segment map cannot hold them)
        instance_ground_truth = str(evaluation.instance_annotations)
    thing_ids = label_info.thing_ids
    # The paper's augmentations already give fixed-size crops: the processor must not resize them again (its own
    # resizing, saved with the model, is the inference one and still applies to evaluation).
    train_processor_kwargs = (
        {"do_resize": False} if settings.augmentation.get("name") in ("coco_lsj", "ade20k") else {}
    )
    return TrainingData(
        train_dataset=AugmentedRecords(
            train.dataset, build_augmentation(settings.augmentation), replace_skipped=on_bad_input == "skip"
        ),
        eval_dataset=AugmentedRecords(evaluation.dataset, None, settings.num_eval_images),
        label_info=label_info,
        collate_fn=SegmentationCollator(processor, task=settings.task, thing_ids=thing_ids, **train_processor_kwargs),
        eval_collate_fn=SegmentationCollator(processor, task=settings.task, thing_ids=thing_ids, keep_targets=True),
        instance_ground_truth=instance_ground_truth,
        skipped=train.skipped + evaluation.skipped,
    )
