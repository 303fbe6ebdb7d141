"""Hub ids and local parquet folders, read with ``datasets.load_dataset`` and decoded into records.

The rows keep their own column names (``column_mapping`` says which is which); ``HubRowConverter`` turns one into a
stored row, and the shared ``RecordDecoder`` decodes it, so a Hub example is checked and skipped like a local one.
"""

from __future__ import annotations

from typing import Any

from ...utils.optional import require
from .decode import RecordDecoder, Transform
from .records import BadExampleError, LabelInfo, SegmentationData

DEFAULT_COLUMNS = {"image": "image", "annotation": "annotation", "segments_info": "segments_info", "image_id": None}
HUB_ANNOTATION_FORMATS = ("coco_panoptic", "semantic", "instance_channels")
_INDEX_COLUMN = "__index__"


class HubRowConverter:
    """A Hub row (the dataset's column names) -> a stored row of our schema (picklable, runs in workers)."""

    def __init__(
        self,
        columns: dict[str, str | None],
        annotation_format: str,
        label_info: LabelInfo,
        label_offset: int,
        ignore_value: int | None,
    ):
        self.columns = columns
        self.annotation_format = annotation_format
        self.category_to_label = label_info.category_to_label
        self.num_labels = label_info.num_labels
        self.label_offset = label_offset
        self.ignore_value = ignore_value

    def __call__(self, row: dict[str, Any], index: int | None = None) -> dict[str, Any]:
        columns = self.columns
        image_id_column = columns.get("image_id")
        image_id = str(row[image_id_column]) if image_id_column else str(index if index is not None else "")
        segment_ids, class_labels, iscrowd = [], [], []
        if self.annotation_format == "coco_panoptic":
            segments = row[columns["segments_info"]]
            if isinstance(segments, dict):  # datasets may give a dict of lists
                keys = list(segments)
                segments = [dict(zip(keys, values)) for values in zip(*segments.values())]
            for segment in segments:
                category = int(segment["category_id"])
                if category not in self.category_to_label:
                    raise BadExampleError(
                        f"image {image_id!r}: segment {segment['id']} has unknown category {category}"
                    )
                segment_ids.append(int(segment["id"]))
                class_labels.append(self.category_to_label[category])
                iscrowd.append(bool(segment.get("iscrowd", 0)))
        return {
            "image": row[columns["image"]],
            "annotation": row[columns["annotation"]],
            "annotation_format": self.annotation_format,
            "segment_ids": segment_ids,
            "class_labels": class_labels,
            "iscrowd": iscrowd,
            "segmentations": [],
            "image_id": image_id,
            "file_name": image_id,
            "label_offset": self.label_offset,
            "num_labels": self.num_labels,
            "ignore_value": self.ignore_value,
        }


def hub_label_info(dataset, columns, annotation_format, id2label, categories) -> LabelInfo:
    """The labels of a Hub dataset: from ``categories``, ``id2label``, a ``semantic_class_to_id`` column, or a
    ``ClassLabel`` feature on the segments' category ids (in this order)."""
    if categories is not None:
        return LabelInfo.from_coco_categories(categories)
    if id2label is None and "semantic_class_to_id" in (dataset.column_names or []):
        # the transformers instance-segmentation example's layout: {name: class value} in every row, 0 = background
        datasets = require("datasets", "data loading")
        first = dataset[0] if not isinstance(dataset, datasets.IterableDataset) else next(iter(dataset))
        id2label = {int(value): name for name, value in first["semantic_class_to_id"].items() if value is not None}
        id2label.pop(0, None)
    if id2label is not None:
        # id2label keys are the dataset's own category values
        ordered = sorted((int(key), name) for key, name in id2label.items())
        return LabelInfo(
            id2label={label: name for label, (_, name) in enumerate(ordered)},
            category_ids={label: key for label, (key, _) in enumerate(ordered)},
            thing_ids=list(range(len(ordered))) if annotation_format != "semantic" else [],
        )
    # a ClassLabel feature on the segments' category ids names the classes (values 0..K-1)
    features = getattr(dataset, "features", None) or {}
    segments_feature = features.get(columns.get("segments_info") or "", None)
    inner = getattr(segments_feature, "feature", None)
    category_feature = inner.get("category_id") if isinstance(inner, dict) else None
    names = getattr(category_feature, "names", None)
    if annotation_format == "coco_panoptic" and names:
        return LabelInfo(
            id2label=dict(enumerate(names)),
            category_ids={label: label for label in range(len(names))},
            thing_ids=list(range(len(names))),
        )
    raise ValueError(
        "a Hub dataset needs its labels: pass id2label={category value: name} (and thing_ids) or categories=[COCO "
        "category dicts]; for ADE20K-style data use id2label with the class values 1..150"
    )


def load_hub_dataset(
    source: str,
    split: str,
    *,
    annotation_format: str = "coco_panoptic",
    column_mapping: dict[str, str | None] | None = None,
    id2label: dict[int, str] | None = None,
    thing_ids: list[int] | None = None,
    categories: list[dict[str, Any]] | None = None,
    label_offset: int | None = None,
    ignore_value: int | None = None,
    streaming: bool = False,
    transform: Transform | None = None,
    on_bad_input: str = "raise",
    task: str = "panoptic",
    **load_kwargs: Any,
) -> SegmentationData:
    """A Hub id or local parquet folder, read with ``datasets.load_dataset`` and decoded into records.

    Args:
        annotation_format: ``"coco_panoptic"`` (annotation PNG of RGB ids + a segments_info column of dicts with
            ``id``, ``category_id``, ``iscrowd``), ``"semantic"`` (a class map) or ``"instance_channels"`` (the
            transformers instance-segmentation example's ade20k-mini layout: channel 0 = class, channel 1 = instance).
        column_mapping: our role -> the dataset's column: ``image``, ``annotation``, ``segments_info``, ``image_id``.
        id2label: dataset class value -> name. Labels are these values in increasing order, remapped to 0..K-1.
            Without it (and without ``categories``), a ``semantic_class_to_id`` column (name -> value, 0 = background,
            as in the transformers instance-segmentation example's datasets) or a ``ClassLabel`` on the segments'
            ``category_id`` names them.
        thing_ids: dataset class values that are things (default: all, except for semantic data).
        label_offset: dataset value of label 0 in class maps (default 1 when id2label starts at 1, else 0).
        ignore_value: class-map value meaning "unlabeled" (e.g. 255).
    """
    datasets = require("datasets", "data loading")
    if annotation_format not in HUB_ANNOTATION_FORMATS:
        raise ValueError(
            f"annotation_format {annotation_format!r} is not readable from the Hub; use one of "
            f"{HUB_ANNOTATION_FORMATS}"
        )
    columns = {**DEFAULT_COLUMNS, **(column_mapping or {})}
    raw = datasets.load_dataset(source, split=split, streaming=streaming, **load_kwargs)
    available = raw.column_names or []
    needed = ["image", "annotation"] + (["segments_info"] if annotation_format == "coco_panoptic" else [])
    missing = [f"{role}={columns[role]!r}" for role in needed if columns[role] not in available]
    if available and missing:
        raise ValueError(
            f"dataset {source!r} has columns {available}; missing {missing}: map them with "
            "column_mapping={{role: column}}"
        )
    label_info = hub_label_info(raw, columns, annotation_format, id2label, categories)
    if thing_ids is not None:
        category_to_label = label_info.category_to_label
        label_info.thing_ids = sorted(category_to_label[value] for value in thing_ids)
    if label_offset is None:
        label_offset = min(label_info.category_ids.values()) if annotation_format != "coco_panoptic" else 0
    if annotation_format != "coco_panoptic":
        expected = list(range(label_offset, label_offset + label_info.num_labels))
        if sorted(label_info.category_ids.values()) != expected:
            raise ValueError(f"class-map datasets need consecutive class values {expected[0]}..{expected[-1]}")
    # keep images undecoded: the decoder reads them, lazily
    for column in (columns["image"], columns["annotation"]):
        if raw.features is not None and isinstance(raw.features.get(column), datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
    if not streaming and not columns.get("image_id"):
        # a map-style transform gets no indices: the row's position becomes a column
        raw = raw.add_column(_INDEX_COLUMN, list(range(len(raw))))
        columns = {**columns, "image_id": _INDEX_COLUMN}
    converter = HubRowConverter(columns, annotation_format, label_info, label_offset, ignore_value)
    decoder = RecordDecoder(transform, on_bad_input, convert=converter)
    if streaming:
        dataset = raw.map(decoder, batched=True, batch_size=1, with_indices=True, remove_columns=available)
    else:
        dataset = raw.with_transform(decoder)
    return SegmentationData(dataset=dataset, label_info=label_info, task=task)
