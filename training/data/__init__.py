"""Segmentation data: every source -> one record type, with its labels, decoded lazily and safe in DataLoader workers.

API
---
- ``load_dataset_for_segmentation(source, split="train", task="panoptic", ...) -> SegmentationData``: ``source`` is a
  local COCO root (``val2017/`` + ``annotations/panoptic_val2017.json`` + PNG folder, or
  ``annotations/instances_val2017.json``), a local ADE20K root (``ADEChallengeData2016``: ``images/``,
  ``annotations/``), ``"synthetic-shapes"`` (generated, ``synthetic.py``) or a Hub id / local parquet folder
  (``column_mapping`` + ``annotation_format`` say how to read it; ``streaming=True`` for large sets).
  ``SegmentationData`` holds ``dataset`` (items are ``SegmentationRecord``s), ``label_info`` (``LabelInfo``: COCO's
  133 panoptic classes with ids 1-200 remapped in order to 0..132, ADE20K's 150 to 0..149), ``skipped`` and
  ``instance_annotations``.
- ``SegmentationRecord`` (``records.py``): ``image``, ``segment_map`` (``(H, W)`` int64 ids, 0 = void),
  ``segment_ids``, ``class_labels``, ``iscrowd``, ``image_id``, ``file_name``, ``skipped``, ``skip_reasons``.
- ``set_segmentation_transform(dataset, transform)``: the same records through another augmentation.
- ``lacks_split(source, split)``: whether a local root has no such split.

Bad input raises a ``BadExampleError`` naming the file and the id, or with ``on_bad_input="skip"`` is left out: named
in ``SegmentationData.skipped`` when found while listing, a placeholder record (``skipped=True``) when found while
decoding, which ``SegmentationCollator`` leaves out and reports under ``batch["skipped"]``.

One module per source: ``coco.py`` (panoptic and instance JSON), ``ade20k.py`` (ADE20K roots, class-map formats),
``parquet.py`` (Hub / parquet), ``synthetic.py``; ``decode.py`` is the one decoding step they share.
"""

from .ade20k import ade20k_label_info
from .decode import RecordDecoder
from .load import lacks_split, load_dataset_for_segmentation, set_segmentation_transform
from .parquet import load_hub_dataset
from .records import (
    BadExampleError,
    LabelInfo,
    SegmentationData,
    SegmentationRecord,
    id_to_rgb,
    keep_visible_segments,
    rgb_to_id,
    semantic_label_map,
)
from .synthetic import SYNTHETIC_SOURCE, generate_synthetic_shapes

__all__ = [
    "SYNTHETIC_SOURCE",
    "BadExampleError",
    "LabelInfo",
    "RecordDecoder",
    "SegmentationData",
    "SegmentationRecord",
    "ade20k_label_info",
    "generate_synthetic_shapes",
    "id_to_rgb",
    "keep_visible_segments",
    "lacks_split",
    "load_dataset_for_segmentation",
    "load_hub_dataset",
    "rgb_to_id",
    "semantic_label_map",
    "set_segmentation_transform",
]
