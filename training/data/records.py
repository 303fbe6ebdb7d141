"""The segmentation record, the labels of a dataset, and the small helpers every data stage shares.

API
---
- ``SegmentationRecord``: the one record type of the data pipeline (readers -> transforms -> collate -> metrics).
- ``LabelInfo``: the labels of a dataset (``id2label``, ``category_ids``, ``thing_ids``, ``ignore_label``).
- ``SegmentationData``: what ``load_dataset_for_segmentation`` returns (dataset, labels, skipped examples).
- ``BadExampleError``: an example whose files or annotations are unusable; the message names the file and the id.
- ``keep_visible_segments(record)``: the segment lists cut down to the segments that still have pixels.
- ``rgb_to_id`` / ``id_to_rgb``: COCO panoptic PNG colours <-> segment ids.
- ``semantic_label_map(record, ignore_label)``: a record -> per-pixel label ids.
- ``skipped_record(reason)``: the placeholder that stands in for an example skipped as bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ON_BAD_INPUT = ("raise", "skip")
Segments = tuple[np.ndarray, list[int], list[int], list[bool]]  # segment map (H, W), ids, labels, crowd flags


class SegmentationRecord(TypedDict):
    """One example as every stage of the data pipeline sees it.

    Semantic data (ADE20K) uses the same record: one segment per class present, segment id = label + 1.

    Keys:
        image: the image: a ``PIL.Image`` (RGB) from a reader, a ``(H, W, 3)`` uint8 array after a transform.
        segment_map: ``(H, W)`` int64 array of segment ids, 0 = void / ignore.
        segment_ids: the segments with pixels in ``segment_map`` (never 0).
        class_labels: contiguous label id (0..num_labels-1) of each segment.
        iscrowd: crowd flag of each segment (crowd regions are not trained on; the metrics handle them).
        image_id: the dataset's image id.
        file_name: the image's file name.
        skipped: True only for the placeholder of an example skipped as bad input (the collator leaves it out).
        skip_reasons: why examples were skipped on the way to this record (the placeholder's own message; for a
            record that replaced skipped examples in training, theirs). The collator reports them, so the count
            reaches the main process from DataLoader workers.
    """

    image: Any
    segment_map: np.ndarray
    segment_ids: list[int]
    class_labels: list[int]
    iscrowd: list[bool]
    image_id: str
    file_name: str
    skipped: bool
    skip_reasons: list[str]


class BadExampleError(ValueError):
    """An example whose files or annotations are inconsistent (the message names the file and the id)."""


@dataclass
class LabelInfo:
    """Labels of a segmentation dataset, as read from its data.

    Args:
        id2label: contiguous label id (0..num_labels-1) -> class name.
        category_ids: contiguous label id -> the dataset's own category id (COCO: 1..200 with gaps; ADE20K: 1..150).
        thing_ids: label ids of countable "thing" classes (empty for semantic data).
        ignore_label: the value that marks unlabeled pixels in semantic label maps built from records (255, or
            ``num_labels`` when 255 is a class).
    """

    id2label: dict[int, str]
    category_ids: dict[int, int]
    thing_ids: list[int] = field(default_factory=list)
    ignore_label: int = 255

    def __post_init__(self) -> None:
        if 0 <= self.ignore_label < len(self.id2label):  # 255 is a real class in sets of more than 255 classes
            self.ignore_label = len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: label for label, name in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def stuff_ids(self) -> list[int]:
        things = set(self.thing_ids)
        return [label for label in self.id2label if label not in things]

    @property
    def category_to_label(self) -> dict[int, int]:
        return {category: label for label, category in self.category_ids.items()}

    @classmethod
    def from_coco_categories(cls, categories: list[dict[str, Any]]) -> LabelInfo:
        """COCO categories (``id``, ``name``, optional ``isthing``) -> labels in increasing category-id order."""
        ordered = sorted(categories, key=lambda category: int(category["id"]))
        return cls(
            id2label={label: str(category["name"]) for label, category in enumerate(ordered)},
            category_ids={label: int(category["id"]) for label, category in enumerate(ordered)},
            # an instances JSON has no `isthing`: every category there is a thing
            thing_ids=[label for label, category in enumerate(ordered) if int(category.get("isthing", 1)) == 1],
        )


@dataclass
class SegmentationData:
    """A loaded segmentation dataset: its records, its labels, and what was left out while listing it.

    Args:
        dataset: a ``datasets.Dataset`` (map-style) or ``datasets.IterableDataset`` (streaming) whose items are
            ``SegmentationRecord``s, decoded when read.
        label_info: the dataset's labels.
        task: the task it was loaded for.
        skipped: messages of the examples left out while listing the source (``on_bad_input="skip"``). Examples
            found bad only when decoded come as placeholder records (``skipped=True``) that the collator reports.
        instance_annotations: the COCO instances JSON of this split when the source has one (COCO's mask AP is
            scored against its overlapping masks, which a record's segment map cannot hold).
    """

    dataset: Any
    label_info: LabelInfo
    task: str
    skipped: list[str] = field(default_factory=list)
    instance_annotations: Path | None = None


def rgb_to_id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours -> segment ids: ``(H, W, 3)`` uint8 -> ``(H, W)`` int64, id = R + 256 G + 256² B."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_id``: ``(H, W)`` ids -> ``(H, W, 3)`` uint8 colours."""
    segment_ids = segment_ids.astype(np.int64)
    return np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536 % 256], axis=-1).astype(
        np.uint8
    )


def keep_visible_segments(record: SegmentationRecord, present: Iterable[int] | None = None) -> SegmentationRecord:
    """The record with only the segments that have pixels in its ``segment_map`` (a crop can empty a mask, a COCO
    annotation can list a segment that another one covers). The image is kept even when no segment is left: it
    trains the no-object class.

    Args:
        record: a segmentation record.
        present: the ids in ``record["segment_map"]``, when the caller has them already.
    """
    present = set(np.unique(record["segment_map"]).tolist()) if present is None else set(present)
    keep = [index for index, segment_id in enumerate(record["segment_ids"]) if segment_id in present]
    return {
        **record,
        "segment_ids": [record["segment_ids"][index] for index in keep],
        "class_labels": [record["class_labels"][index] for index in keep],
        "iscrowd": [record["iscrowd"][index] for index in keep],
    }


def semantic_label_map(record: SegmentationRecord, ignore_label: int = 255) -> np.ndarray:
    """A record -> ``(H, W)`` int64 map of label ids, ``ignore_label`` where void (crowd regions keep their class)."""
    segment_map = np.asarray(record["segment_map"])
    lookup_ids = np.asarray([0, *record["segment_ids"]], dtype=np.int64)
    lookup_labels = np.asarray([ignore_label, *record["class_labels"]], dtype=np.int64)
    order = np.argsort(lookup_ids)
    positions = np.searchsorted(lookup_ids[order], segment_map)
    positions = np.clip(positions, 0, len(order) - 1)
    found = lookup_ids[order][positions] == segment_map
    return np.where(found, lookup_labels[order][positions], ignore_label)


def skipped_record(reason: str) -> SegmentationRecord:
    """The placeholder for an example skipped as bad input (map-style datasets cannot drop rows on access)."""
    return {
        "image": Image.new("RGB", (1, 1)),
        "segment_map": np.zeros((1, 1), dtype=np.int64),
        "segment_ids": [],
        "class_labels": [],
        "iscrowd": [],
        "image_id": "",
        "file_name": "",
        "skipped": True,
        "skip_reasons": [reason],
    }


def check_on_bad_input(on_bad_input: str) -> str:
    if on_bad_input not in ON_BAD_INPUT:
        raise ValueError(f"on_bad_input must be 'raise' or 'skip', got {on_bad_input!r}")
    return on_bad_input


def report_bad_example(message: str, on_bad_input: str, skipped: list[str]) -> None:
    """A bad example found while listing a source: raise, or log it and add it to ``skipped``."""
    if on_bad_input == "skip":
        logger.warning("skipping example: %s", message)
        skipped.append(message)
        return
    raise BadExampleError(message + " (pass on_bad_input='skip' to skip such examples)")


def stored_file(path: Path) -> dict[str, Any]:
    """A file as a stored row holds it: an undecoded ``datasets.Image`` value (read when the example is decoded)."""
    return {"path": str(path), "bytes": None}


def listing_progress(items: list, description: str):
    """A tqdm bar for the listing of large sets (COCO train has 118k images); silent for small ones."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, disable=len(items) < 5000, leave=False)
