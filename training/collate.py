"""Batch segmentation records into model inputs through the image processor.

API
---
``SegmentationCollator(processor, task="panoptic", thing_ids=None, keep_targets=False, **processor_kwargs)`` is a
picklable ``collate_fn`` for ``torch.utils.data.DataLoader``: ``list[record] -> BatchFeature`` with

- ``pixel_values``  ``(B, 3, H, W)`` float, ``pixel_mask`` ``(B, H, W)`` long (1 = real pixel, 0 = padding)
- ``mask_labels``   list of B ``(N_i, H, W)`` float binary masks (``N_i`` may be 0: images without objects stay)
- ``class_labels``  list of B ``(N_i,)`` long label ids
- ``targets``       (only with ``keep_targets=True``, for evaluation; pop it before ``model(**batch)``) the records'
  ``segment_map`` / ``segment_ids`` / ``class_labels`` / ``iscrowd`` / ``image_id`` / ``file_name`` at their
  own resolution.
- ``skipped``       (only when examples were skipped as bad input; pop it before ``model(**batch)``) list of the
  reasons: the placeholders of skipped examples are left out of the batch, and this is how their count reaches the
  main process from DataLoader workers. A batch whose every example was skipped holds only ``skipped``.

Which segments become training targets: crowd segments never (as in the paper's code, they are neither objects
nor background); for ``task="instance"`` only thing classes; for ``task="semantic"`` one mask per class (segments of
a class are merged). The processor (``mask2former.Mask2FormerImageProcessor``; transformers' also works) does the
resizing, normalisation, padding and the mask encoding; segment ids are renumbered 1..N per image first, so any id
range (COCO ids go up to 2^24) is safe, and the processor must run with ``do_reduce_labels=False``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature

from ..processing.tasks import check_task
from .data.records import SegmentationRecord

# class given to void pixels so that the processor's mask for them can be recognised and dropped, whatever its
# ignore_index is
_VOID_CLASS = -1


def renumber_segments(
    record: SegmentationRecord, task: str = "panoptic", thing_ids: Iterable[int] | None = None
) -> tuple[np.ndarray, dict[int, int]]:
    """A record -> ``(H, W)`` int64 map with training segments numbered 1..N (0 = not trained on) and ``{id: label}``.

    The mapping also holds ``0: -1`` (void), so that processors without an ``ignore_index`` can encode the map.
    """
    check_task(task)
    things = set(thing_ids) if thing_ids is not None else None
    if task == "instance" and things is None:
        raise ValueError("task='instance' needs thing_ids (load_dataset_for_segmentation(...).label_info.thing_ids)")
    segment_map = np.asarray(record["segment_map"])
    new_id_of_segment: dict[int, int] = {}
    id_to_label: dict[int, int] = {0: _VOID_CLASS}
    new_id_of_label: dict[int, int] = {}
    for segment_id, label, crowd in zip(record["segment_ids"], record["class_labels"], record["iscrowd"]):
        if crowd or (task == "instance" and label not in things):
            continue
        if task == "semantic":  # one target per class
            if label not in new_id_of_label:
                new_id_of_label[label] = len(new_id_of_label) + 1
            new_id = new_id_of_label[label]
        else:
            new_id = len(new_id_of_segment) + 1
        new_id_of_segment[int(segment_id)] = new_id
        id_to_label[new_id] = int(label)
    # (H, W) ids -> (H, W) positions into the unique ids -> new ids
    unique_ids, inverse = np.unique(segment_map, return_inverse=True)
    new_ids = np.asarray([new_id_of_segment.get(int(value), 0) for value in unique_ids], dtype=np.int64)
    return new_ids[inverse.reshape(segment_map.shape)], id_to_label


class SegmentationCollator:
    """``collate_fn``: records -> ``BatchFeature`` of ``pixel_values``, ``pixel_mask``, ``mask_labels``,
    ``class_labels`` (per-image lists) via ``processor``.

    Args:
        processor: a ``Mask2FormerImageProcessor`` (``do_reduce_labels`` must be off).
        task: ``"panoptic"``, ``"instance"`` or ``"semantic"`` (which segments become targets, see module docstring).
        thing_ids: label ids of thing classes (needed for ``"instance"``).
        keep_targets: also return the records' ground truth under ``"targets"`` (for the evaluators).
        processor_kwargs: passed to every processor call (e.g. ``do_resize=False`` after a fixed-size crop).
    """

    def __init__(
        self,
        processor: Any,
        task: str = "panoptic",
        thing_ids: Iterable[int] | None = None,
        keep_targets: bool = False,
        **processor_kwargs: Any,
    ):
        if getattr(processor, "do_reduce_labels", False):
            raise ValueError(
                "SegmentationCollator gives label ids as they are: create the processor with do_reduce_labels=False"
            )
        check_task(task)
        self.processor = processor
        self.task = task
        self.thing_ids = sorted(thing_ids) if thing_ids is not None else None
        self.keep_targets = keep_targets
        self.processor_kwargs = processor_kwargs

    def __call__(self, records: list[SegmentationRecord]):
        # examples skipped while decoding (on_bad_input="skip") come as placeholders: leave them out, and report
        # why in the batch, which is how the reasons reach the main process from DataLoader workers
        skip_reasons = [reason for record in records for reason in record.get("skip_reasons", ())]
        records = [record for record in records if not record.get("skipped")]
        if not records:
            if skip_reasons:  # every example of the batch was bad: nothing to run, only the reasons to report
                return BatchFeature({"skipped": skip_reasons})
            raise ValueError("cannot collate an empty batch: no records were given")
        images, segmentation_maps, mappings = [], [], []
        for record in records:
            segmentation_map, id_to_label = renumber_segments(record, self.task, self.thing_ids)
            images.append(np.array(record["image"]))  # a writable copy (torch warns on read-only arrays)
            segmentation_maps.append(segmentation_map)
            mappings.append(id_to_label)
        batch = self.processor(
            images=images,
            segmentation_maps=segmentation_maps,
            instance_id_to_semantic_id=mappings,
            return_tensors="pt",
            **self.processor_kwargs,
        )
        mask_labels, class_labels = [], []
        for masks, labels, pixel_mask in zip(batch["mask_labels"], batch["class_labels"], batch["pixel_mask"]):
            labels = torch.as_tensor(labels, dtype=torch.long)
            keep = labels != _VOID_CLASS  # drop the void mask (present when the processor has no ignore_index)
            masks = torch.as_tensor(masks)[keep].float()  # (N_i + 1?, H, W) -> (N_i, H, W)
            # padding is never part of an object (transformers' processor pads masks with its ignore_index)
            mask_labels.append(masks * pixel_mask.to(masks.dtype))
            class_labels.append(labels[keep])
        batch["mask_labels"] = mask_labels
        batch["class_labels"] = class_labels
        if self.keep_targets:
            batch["targets"] = [
                {
                    "segment_map": torch.as_tensor(np.asarray(record["segment_map"])),
                    "segment_ids": list(record["segment_ids"]),
                    "class_labels": list(record["class_labels"]),
                    "iscrowd": list(record["iscrowd"]),
                    "image_id": record.get("image_id", ""),
                    "file_name": record.get("file_name", ""),
                }
                for record in records
            ]
        if skip_reasons:
            batch["skipped"] = skip_reasons
        return batch
