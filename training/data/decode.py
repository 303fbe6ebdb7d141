"""Stored rows -> segmentation records: the one decoding step that every source goes through.

A *stored row* is what a reader lists without decoding anything (paths or bytes of the image and the annotation,
the per-segment lists, the annotation format); ``ROW_FEATURES`` is its schema. ``RecordDecoder`` turns rows into
records when an example is read (lazily, in DataLoader workers), and is the place where a bad example is raised or
skipped: a skipped example becomes a ``skipped_record`` placeholder, whose reason travels with the batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from PIL import Image

from ...processing.image_io import ImageReadError, read_image, read_label_image, to_rgb
from ...utils.optional import require
from .ade20k import instance_channel_segments, semantic_segments
from .coco import instance_segments, panoptic_segments
from .records import BadExampleError, SegmentationRecord, check_on_bad_input, skipped_record

logger = logging.getLogger(__name__)

ANNOTATION_FORMATS = ("coco_panoptic", "coco_instance", "semantic", "instance_channels")
_ANNOTATION_DECODERS = {
    "coco_panoptic": panoptic_segments,
    "semantic": semantic_segments,
    "instance_channels": instance_channel_segments,
}

Transform = Callable[[SegmentationRecord], SegmentationRecord]
RowConverter = Callable[[dict[str, Any], int | None], dict[str, Any]]


def row_features():
    """The ``datasets.Features`` of a stored row (images stay undecoded: our decoder reads them)."""
    datasets = require("datasets", "data loading")
    return datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "annotation": datasets.Image(decode=False),
            "annotation_format": datasets.Value("string"),
            "segment_ids": datasets.List(datasets.Value("int64")),
            "class_labels": datasets.List(datasets.Value("int64")),
            "iscrowd": datasets.List(datasets.Value("bool")),
            "segmentations": datasets.List(datasets.Value("string")),
            "image_id": datasets.Value("string"),
            "file_name": datasets.Value("string"),
            "label_offset": datasets.Value("int64"),
            "num_labels": datasets.Value("int64"),
            "ignore_value": datasets.Value("int64"),
        }
    )


def rows_to_dataset(rows: list[dict[str, Any]]):
    """Stored rows (dicts, missing keys allowed) -> an undecoded ``datasets.Dataset`` of ``row_features()``."""
    datasets = require("datasets", "data loading")
    features = row_features()
    columns = {name: [row.get(name) for row in rows] for name in features}
    for name in ("segment_ids", "class_labels", "iscrowd", "segmentations"):
        columns[name] = [value or [] for value in columns[name]]
    return datasets.Dataset.from_dict(columns, features=features)


def _read(value: Any, what: str, image_id: str, reader: Callable[..., Image.Image]) -> tuple[Image.Image, str]:
    """A stored file (path, bytes, undecoded ``datasets.Image`` value ``{"bytes", "path"}``, or a PIL image) -> the
    image read by ``reader`` and the name messages use for it."""
    if isinstance(value, Image.Image):
        return (to_rgb(value) if reader is read_image else value), getattr(
            value, "filename", ""
        ) or f"{what} of {image_id}"
    name = None
    if isinstance(value, dict):  # embedded bytes win over the path, which may only be informative
        name = value.get("path")
        value = value.get("bytes") or name
    if value is None:
        raise BadExampleError(f"{what} of image {image_id!r} is missing")
    if name is None:
        name = str(value) if isinstance(value, (str, os.PathLike)) else f"<{what} bytes of image {image_id}>"
    try:
        return reader(value, name, what), str(name)
    except ImageReadError as error:
        raise BadExampleError(f"{error} (image id {image_id!r})") from error


def decode_row(row: dict[str, Any]) -> SegmentationRecord:
    """One stored row -> a segmentation record (raises ``BadExampleError`` naming the file and the id)."""
    image_id = str(row["image_id"])
    image, image_name = _read(row["image"], "image", image_id, read_image)
    width, height = image.size
    annotation_format = row["annotation_format"]
    if annotation_format == "coco_instance":
        segments = instance_segments(row, height, width, image_id)
    elif annotation_format in _ANNOTATION_DECODERS:
        annotation, annotation_name = _read(row["annotation"], "annotation", image_id, read_label_image)
        if annotation.size != (width, height):
            raise BadExampleError(
                f"annotation {annotation_name!r} of image {image_id!r} is {annotation.size[0]}x{annotation.size[1]}, "
                f"the image is {width}x{height}"
            )
        segments = _ANNOTATION_DECODERS[annotation_format](row, annotation, annotation_name, image_id)
    else:
        raise ValueError(f"unknown annotation_format {annotation_format!r}; use one of {ANNOTATION_FORMATS}")
    segment_map, segment_ids, class_labels, iscrowd = segments
    return {
        "image": image,
        "segment_map": segment_map,
        "segment_ids": segment_ids,
        "class_labels": class_labels,
        "iscrowd": iscrowd,
        "image_id": image_id,
        "file_name": row.get("file_name") or os.path.basename(image_name),
        "skipped": False,
        "skip_reasons": [],
    }


class RecordDecoder:
    """Stored rows -> segmentation records, then the optional augmentation: the decoding step of every source.

    Picklable, so it runs in DataLoader workers. It is a batch transform for both kinds of dataset:
    ``dataset.with_transform(decoder)`` (map-style) and ``stream.map(decoder, batched=True, with_indices=True)``.
    A bad example raises ``BadExampleError``, or with ``on_bad_input="skip"`` is logged and comes back as a
    ``skipped_record`` placeholder carrying the reason, which the collator leaves out and reports.

    Args:
        transform: ``record -> record`` applied after decoding (an augmentation of ``training/transforms.py``).
        on_bad_input: ``"raise"`` or ``"skip"``.
        convert: ``(row, index) -> stored row`` for sources whose rows have another schema (Hub datasets).
    """

    def __init__(
        self, transform: Transform | None = None, on_bad_input: str = "raise", convert: RowConverter | None = None
    ):
        self.transform = transform
        self.on_bad_input = check_on_bad_input(on_bad_input)
        self.convert = convert

    def with_transform(self, transform: Transform | None) -> RecordDecoder:
        """The same decoding with another augmentation."""
        return RecordDecoder(transform, self.on_bad_input, self.convert)

    def decode(self, row: dict[str, Any], index: int | None = None) -> SegmentationRecord:
        """One row (of the source's schema) -> a record, or the placeholder of a skipped example."""
        try:
            record = decode_row(self.convert(row, index) if self.convert is not None else row)
        except BadExampleError as error:
            if self.on_bad_input == "skip":
                logger.warning("skipping example: %s", error)
                return skipped_record(str(error))
            raise
        return self.transform(record) if self.transform is not None else record

    def __call__(self, batch: dict[str, list[Any]], indices: list[int] | None = None) -> dict[str, list[Any]]:
        size = len(next(iter(batch.values())))
        records = [
            self.decode(
                {key: values[position] for key, values in batch.items()},
                indices[position] if indices is not None else None,
            )
            for position in range(size)
        ]
        return {key: [record[key] for record in records] for key in records[0]}
