"""Hub ids and local COCO / ADE20K folders -> one record type, through 🤗 `datasets`.

API
---
- ``load_dataset_for_segmentation(source, split="train", task="panoptic", ...) -> datasets.Dataset | IterableDataset``
  ``source`` is a local COCO root (``val2017/`` + ``annotations/panoptic_val2017.json`` + PNG folder, or
  ``annotations/instances_val2017.json``), a local ADE20K root (``ADEChallengeData2016``: ``images/``,
  ``annotations/``), ``"synthetic-shapes"`` (generated, see ``training/synthetic.py``) or a Hub id / local parquet
  folder (``column_mapping`` + ``annotation_format`` say how to read it; ``streaming=True`` for large sets).
- Every example it yields is a **segmentation record** (a plain dict, decoded lazily on access):

  ``image``        PIL.Image (RGB) (transforms turn it into a ``(H, W, 3)`` uint8 array)
  ``segment_map``  ``(H, W)`` int64 array of segment ids, 0 = void / ignore
  ``segment_ids``  list[int], the segments with pixels in ``segment_map`` (never 0)
  ``class_labels`` list[int], contiguous label id (0..num_labels-1) of each segment
  ``iscrowd``      list[bool], crowd flag of each segment (crowd regions are not trained on, handled by the metrics)
  ``image_id``     str, the dataset's image id; ``file_name``: str, the image's file name
  ``skipped``      bool, True only for the placeholder of an example skipped as bad input (see below)

  Semantic data (ADE20K) uses the same record: one segment per class present, segment id = label + 1.
- ``segmentation_label_info(dataset) -> LabelInfo`` (``id2label``, ``label2id``, ``thing_ids``, ``category_ids``:
  label -> the dataset's own category id, ``ignore_label``) read from the data (COCO's 133 panoptic classes with ids
  1-200 are remapped in order to 0..132; ADE20K's 150 classes to 0..149).
- ``set_segmentation_transform(dataset, transform)`` applies ``transform(record) -> record`` (an augmentation from
  ``training/transforms.py``) after decoding, lazily, keeping the decoding step.

Loading is lazy (only paths and small per-segment lists are materialised, images and PNGs are decoded when an example
is read), the datasets pickle into DataLoader workers, and bad input raises a ``ValueError`` naming the file and id,
or is skipped and counted with ``on_bad_input="skip"`` (``skipped_examples()`` lists them; a map-style dataset
returns a placeholder record with ``skipped=True`` for an example found bad when decoded, which the collator drops).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..processing.tasks import TASKS
from ..utils.optional import require

logger = logging.getLogger(__name__)

SYNTHETIC_SOURCE = "synthetic-shapes"
ANNOTATION_FORMATS = ("coco_panoptic", "coco_instance", "semantic", "instance_channels")
_INFO_KEY = "mask2former_label_info"

Record = dict[str, Any]


def _require_datasets():
    return require("datasets", "data loading")


def _require_mask_utils():
    return require("pycocotools.mask", "decoding COCO instance masks")


# ---------------------------------------------------------------------------------------------------------------------
# Label metadata
# ---------------------------------------------------------------------------------------------------------------------


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

    def to_json(self) -> str:
        return json.dumps(
            {
                "id2label": {str(k): v for k, v in self.id2label.items()},
                "category_ids": {str(k): v for k, v in self.category_ids.items()},
                "thing_ids": self.thing_ids,
                "ignore_label": self.ignore_label,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> LabelInfo:
        data = json.loads(text)
        return cls(
            id2label={int(k): v for k, v in data["id2label"].items()},
            category_ids={int(k): int(v) for k, v in data["category_ids"].items()},
            thing_ids=list(data["thing_ids"]),
            ignore_label=int(data.get("ignore_label", 255)),
        )

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


def segmentation_label_info(dataset) -> LabelInfo:
    """The ``LabelInfo`` that ``load_dataset_for_segmentation`` stored in ``dataset.info``."""
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    try:
        return LabelInfo.from_json(json.loads(description)[_INFO_KEY])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            "this dataset carries no mask2former label info; load it with load_dataset_for_segmentation"
        ) from error


def _attach_info(dataset, label_info: LabelInfo, task: str):
    dataset.info.description = json.dumps({_INFO_KEY: label_info.to_json(), "task": task})
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Decoding stored rows into records
# ---------------------------------------------------------------------------------------------------------------------


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


class BadExampleError(ValueError):
    """An example whose files or annotations are inconsistent (the message names the file and the id)."""


def _open_image(image: Any, what: str, image_id: str) -> Image.Image:
    """A path, encoded bytes, an undecoded ``datasets.Image`` value (``{"bytes", "path"}``) or a PIL image -> PIL."""
    if image is None:
        raise BadExampleError(f"{what} of image {image_id!r} is missing")
    name = None
    if isinstance(image, dict):  # undecoded datasets.Image value: embedded bytes win over the (informative) path
        name = image.get("path")
        image = image.get("bytes") or name
        if image is None:
            raise BadExampleError(f"{what} of image {image_id!r} is missing")
    if isinstance(image, (bytes, bytearray, str, os.PathLike)):
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else str(image)
        name = str(image) if not isinstance(image, (bytes, bytearray)) else name or f"<{what} bytes>"
        try:
            opened = Image.open(source)
            opened.load()
        except (OSError, ValueError) as error:
            raise BadExampleError(f"cannot read {what} {name!r} of image {image_id!r}: {error}") from error
        if not getattr(opened, "filename", ""):
            opened.filename = name  # so that later messages can name the file
        return opened
    return image


def _decode_row(row: dict[str, Any]) -> Record:
    """One stored row (paths / PNGs / per-segment lists) -> a segmentation record (see module docstring)."""
    image_id = str(row["image_id"])
    image_source = row["image"]
    image = _open_image(image_source, "image", image_id)
    image_name = getattr(image, "filename", "") or row.get("file_name") or image_id
    try:
        image = image.convert("RGB")
    except OSError as error:
        raise BadExampleError(f"cannot decode image {image_name!r} (id {image_id!r}): {error}") from error
    width, height = image.size
    annotation_format = row["annotation_format"]
    segment_ids = [int(value) for value in row["segment_ids"]]
    class_labels = [int(value) for value in row["class_labels"]]
    iscrowd = [bool(value) for value in row["iscrowd"]]

    if annotation_format == "coco_instance":
        segment_map = _render_instances(row["segmentations"], segment_ids, height, width, image_id)
        present = set(np.unique(segment_map).tolist())
        keep = [index for index, segment_id in enumerate(segment_ids) if segment_id in present]
        segment_ids = [segment_ids[index] for index in keep]
        class_labels = [class_labels[index] for index in keep]
        iscrowd = [iscrowd[index] for index in keep]
    else:
        annotation = _open_image(row["annotation"], "annotation", image_id)
        annotation_name = getattr(annotation, "filename", "") or f"annotation of {image_id}"
        if annotation.size != (width, height):
            raise BadExampleError(
                f"annotation {annotation_name!r} of image {image_id!r} is {annotation.size[0]}x{annotation.size[1]}, "
                f"the image is {width}x{height}"
            )
        array = np.asarray(annotation)
        if annotation_format == "coco_panoptic":
            segment_map = rgb_to_id(np.asarray(annotation.convert("RGB")))
            present = set(np.unique(segment_map).tolist()) - {0}
            unknown = present - set(segment_ids)
            if unknown:
                raise BadExampleError(
                    f"annotation {annotation_name!r} of image {image_id!r} has segment ids {sorted(unknown)} "
                    "that its segments_info does not list"
                )
            # a listed segment without pixels labels nothing: leave it out so that the lists match the map
            keep = [index for index, segment_id in enumerate(segment_ids) if segment_id in present]
            segment_ids = [segment_ids[index] for index in keep]
            class_labels = [class_labels[index] for index in keep]
            iscrowd = [iscrowd[index] for index in keep]
        elif annotation_format == "semantic":
            # one segment per class present: segment id = label + 1 (0 = unlabeled)
            if array.ndim == 3:
                array = array[..., 0]
            segment_map = _semantic_to_segment_map(array.astype(np.int64), row, annotation_name, image_id)
            segment_ids, class_labels, iscrowd = _segments_of_semantic(segment_map)
        elif annotation_format == "instance_channels":
            segment_map, segment_ids, class_labels = _instance_channels_to_segments(array, row, annotation_name)
            iscrowd = [False] * len(segment_ids)
        else:
            raise ValueError(f"unknown annotation_format {annotation_format!r}; use one of {ANNOTATION_FORMATS}")
    return {
        "image": image,
        "segment_map": segment_map,
        "segment_ids": segment_ids,
        "class_labels": class_labels,
        "iscrowd": iscrowd,
        "image_id": image_id,
        "file_name": row.get("file_name") or os.path.basename(str(image_name)),
        "skipped": False,
    }


def _semantic_to_segment_map(array: np.ndarray, row: dict[str, Any], name: str, image_id: str) -> np.ndarray:
    """Class map with ``label = value - offset`` (ADE20K: offset 1, 0 = ignore) -> segment map (id = label + 1)."""
    offset = int(row.get("label_offset") or 0)
    num_labels = int(row["num_labels"])
    ignore_value = row.get("ignore_value")
    labels = array - offset
    valid = (labels >= 0) & (labels < num_labels)
    if ignore_value is not None:
        valid &= array != int(ignore_value)
    invalid_values = np.unique(array[~valid]).tolist()
    allowed_invalid = {int(ignore_value)} if ignore_value is not None else set()
    allowed_invalid |= set(range(offset))  # values below the offset (ADE20K: 0) are "unlabeled"
    unknown = sorted(set(invalid_values) - allowed_invalid)
    if unknown:
        raise BadExampleError(f"annotation {name!r} of image {image_id!r} has unknown class values {unknown}")
    return np.where(valid, labels + 1, 0).astype(np.int64)


def _segments_of_semantic(segment_map: np.ndarray) -> tuple[list[int], list[int], list[bool]]:
    segment_ids = [int(value) for value in np.unique(segment_map) if value != 0]
    return segment_ids, [value - 1 for value in segment_ids], [False] * len(segment_ids)


def _instance_channels_to_segments(array: np.ndarray, row: dict[str, Any], name: str):
    """ade20k-mini layout: channel 0 = class value, channel 1 = instance id (0 = none) -> segment map + labels."""
    if array.ndim != 3 or array.shape[-1] < 2:
        raise BadExampleError(f"annotation {name!r} needs class and instance channels, got shape {array.shape}")
    offset = int(row.get("label_offset") or 0)
    class_values = array[..., 0].astype(np.int64)
    instance_values = array[..., 1].astype(np.int64)
    # an instance id may be reused by two classes: the (class, instance) pair is the segment
    pair = class_values * 256 + instance_values
    pair = np.where(instance_values > 0, pair, 0)
    pair_ids, segment_map = np.unique(pair, return_inverse=True)
    segment_map = segment_map.reshape(pair.shape).astype(np.int64)
    if pair_ids[0] != 0:  # no background pixel: ids are 1-based already
        segment_map += 1
        pair_ids = np.concatenate([[0], pair_ids])
    segment_ids, class_labels = [], []
    for index, pair_id in enumerate(pair_ids.tolist()):
        if index == 0:
            continue
        label = pair_id // 256 - offset
        if not 0 <= label < int(row["num_labels"]):
            raise BadExampleError(f"annotation {name!r} has unknown class value {pair_id // 256}")
        segment_ids.append(index)
        class_labels.append(label)
    return segment_map, segment_ids, class_labels


def _render_instances(
    segmentations: list[str], segment_ids: list[int], height: int, width: int, image_id: str
) -> np.ndarray:
    """COCO instance annotations (RLE or polygons, JSON strings) -> segment map, larger instances painted first.

    Where instances overlap, the smaller one wins the pixel (it would otherwise vanish); the metrics read instance
    ground truth from the JSON, so this only affects training targets.
    """
    mask_utils = _require_mask_utils()
    masks = []
    for text, segment_id in zip(segmentations, segment_ids):
        segmentation = json.loads(text)
        if isinstance(segmentation, list):  # polygons
            rles = mask_utils.frPyObjects(segmentation, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if tuple(rle["size"]) != (height, width):
                raise BadExampleError(
                    f"instance annotation {segment_id} of image {image_id!r} is {rle['size']}, the image is "
                    f"{[height, width]}"
                )
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        masks.append(mask_utils.decode(rle).astype(bool))
    segment_map = np.zeros((height, width), dtype=np.int64)
    for index in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        segment_map[masks[index]] = segment_ids[index]
    return segment_map


class _Decoder:
    """Picklable batch transform: stored rows -> records, then an optional augmentation (DataLoader-worker safe)."""

    def __init__(self, transform: Callable[[Record], Record] | None = None, on_bad_input: str = "raise"):
        self.transform = transform
        self.on_bad_input = on_bad_input

    def decode_one(self, row: dict[str, Any], convert: Callable[[dict], dict] | None = None) -> Record | None:
        """Decode one stored row (after ``convert``, for Hub rows); ``None`` when skipped as bad input."""
        try:
            record = _decode_row(convert(row) if convert is not None else row)
        except BadExampleError as error:
            if self.on_bad_input == "skip":
                logger.warning("skipping example: %s", error)
                _SKIPPED.append(str(error))
                return None
            raise
        return self.transform(record) if self.transform is not None else record

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        size = len(next(iter(batch.values())))
        records = [self.decode_one({key: values[index] for key, values in batch.items()}) for index in range(size)]
        if any(record is None for record in records):
            # a map-style dataset cannot drop rows on access: a skipped example comes back as an empty record
            records = [record if record is not None else _empty_record() for record in records]
        keys = records[0].keys()
        return {key: [record[key] for record in records] for key in keys}


_SKIPPED: list[str] = []


def _not_skipped(record: Record) -> bool:
    return not record.get("skipped")


def skipped_examples() -> list[str]:
    """Messages of the examples skipped (``on_bad_input="skip"``) in this process so far."""
    return list(_SKIPPED)


def _empty_record() -> Record:
    """Stands in for a skipped example in a map-style dataset (``skipped=True``; the collator leaves it out)."""
    return {
        "skipped": True,
        "image": Image.new("RGB", (1, 1)),
        "segment_map": np.zeros((1, 1), dtype=np.int64),
        "segment_ids": [],
        "class_labels": [],
        "iscrowd": [],
        "image_id": "",
        "file_name": "",
    }


def set_segmentation_transform(dataset, transform: Callable[[Record], Record] | None):
    """A copy of a map-style dataset from ``load_dataset_for_segmentation`` whose records pass through ``transform``
    (replacing the previous one; decoding is kept). Streaming datasets take ``transform=`` when loaded."""
    datasets = _require_datasets()
    if isinstance(dataset, datasets.IterableDataset):
        raise ValueError("for a streaming dataset pass transform= to load_dataset_for_segmentation")
    current = (dataset.format.get("format_kwargs") or {}).get("transform")
    if isinstance(current, _Decoder):
        replacement = _Decoder(transform, current.on_bad_input)
    elif isinstance(current, _HubDecoder):
        replacement = _HubDecoder(current.converter, _Decoder(transform, current.decoder.on_bad_input))
    else:
        raise ValueError("set_segmentation_transform needs a dataset returned by load_dataset_for_segmentation")
    return dataset.with_transform(replacement)


class _SingleRowDecoder:
    def __init__(self, decoder: _Decoder):
        self.decoder = decoder

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        record = self.decoder.decode_one(row)
        return record if record is not None else _empty_record()


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


def _coco_split_name(root: Path, split: str) -> str:
    """``train``/``val`` or ``train2017``/``val2017`` -> the folder name present under ``root``."""
    if (root / split).is_dir():
        return split
    for candidate in (f"{split}2017", f"{split}2014"):
        if (root / candidate).is_dir():
            return candidate
    raise ValueError(f"no image folder for split {split!r} under COCO root {root} (expected {root / split}/)")


def _is_ade_root(root: Path) -> bool:
    return (root / "images" / "training").is_dir() or (root / "images" / "validation").is_dir()


def _features(datasets):
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


def _rows_to_dataset(rows: list[dict[str, Any]], label_info: LabelInfo, task: str):
    datasets = _require_datasets()
    features = _features(datasets)
    columns = {name: [row.get(name) for row in rows] for name in features}
    for name in ("segment_ids", "class_labels", "iscrowd", "segmentations"):
        columns[name] = [value or [] for value in columns[name]]
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return _attach_info(dataset, label_info, task)


def _progress(items: list, description: str):
    """A tqdm bar for the listing of large sets (COCO train has 118k images); silent for small ones."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=description, disable=len(items) < 5000, leave=False)


def _check_bad(message: str, on_bad_input: str, skipped: list[str]) -> None:
    if on_bad_input == "skip":
        logger.warning("skipping example: %s", message)
        skipped.append(message)
        return
    raise ValueError(message + " (pass on_bad_input='skip' to skip such examples)")


def coco_panoptic_rows(
    root: str | Path, split: str, on_bad_input: str = "raise"
) -> tuple[list[dict[str, Any]], LabelInfo, list[str]]:
    """Rows of a COCO panoptic root (``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/``).

    Returns ``(rows, label_info, skipped)``; checks what can be checked without decoding images (files exist,
    category ids known, ids unique); PNG content is checked when a record is decoded.
    """
    root = Path(root)
    split = _coco_split_name(root, split)
    json_path = root / "annotations" / f"panoptic_{split}.json"
    png_dir = root / "annotations" / f"panoptic_{split}"
    with open(json_path) as handle:
        data = json.load(handle)
    if not data.get("annotations"):
        raise ValueError(f"{json_path} has an empty annotation list: nothing to load")
    label_info = LabelInfo.from_coco_categories(data["categories"])
    category_to_label = label_info.category_to_label
    images = {image["id"]: image for image in data["images"]}
    rows, skipped = [], []
    annotated = {annotation["image_id"] for annotation in data["annotations"]}
    for image_id in images:
        if image_id not in annotated:
            _check_bad(f"{json_path}: image id {image_id} has no panoptic annotation", on_bad_input, skipped)
    for annotation in _progress(data["annotations"], f"reading {json_path.name}"):
        image_id = annotation["image_id"]
        image = images.get(image_id)
        if image is None:
            _check_bad(
                f"{json_path}: annotation {annotation['file_name']!r} has unknown image id {image_id}",
                on_bad_input,
                skipped,
            )
            continue
        image_path = root / split / image["file_name"]
        png_path = png_dir / annotation["file_name"]
        missing = [str(path) for path in (image_path, png_path) if not path.is_file()]
        if missing:
            _check_bad(f"missing file(s) {missing} for image id {image_id}", on_bad_input, skipped)
            continue
        segments = annotation["segments_info"]
        unknown = sorted({s["category_id"] for s in segments} - set(category_to_label))
        ids = [int(s["id"]) for s in segments]
        if unknown:
            _check_bad(f"{json_path}: image id {image_id} has unknown category ids {unknown}", on_bad_input, skipped)
            continue
        if len(set(ids)) != len(ids) or 0 in ids:
            _check_bad(f"{json_path}: image id {image_id} has repeated or zero segment ids", on_bad_input, skipped)
            continue
        rows.append(
            {
                "image": {"path": str(image_path), "bytes": None},
                "annotation": {"path": str(png_path), "bytes": None},
                "annotation_format": "coco_panoptic",
                "segment_ids": ids,
                "class_labels": [category_to_label[s["category_id"]] for s in segments],
                "iscrowd": [bool(s.get("iscrowd", 0)) for s in segments],
                "image_id": str(image_id),
                "file_name": image["file_name"],
                "num_labels": label_info.num_labels,
            }
        )
    return rows, label_info, skipped


def coco_instance_rows(
    root: str | Path, split: str, on_bad_input: str = "raise"
) -> tuple[list[dict[str, Any]], LabelInfo, list[str]]:
    """Rows of a COCO instance root (``annotations/instances_<split>.json``, RLE or polygon masks).

    Segment ids are 1..N per image in annotation order; the masks stay encoded until a record is decoded.
    Images without annotations are kept (empty images train the no-object class).
    """
    root = Path(root)
    split = _coco_split_name(root, split)
    json_path = root / "annotations" / f"instances_{split}.json"
    with open(json_path) as handle:
        data = json.load(handle)
    if not data.get("annotations"):
        raise ValueError(f"{json_path} has an empty annotation list: nothing to load")
    categories = data["categories"]
    panoptic_categories = root / "annotations" / "panoptic_coco_categories.json"
    if all("isthing" not in category for category in categories) and panoptic_categories.is_file():
        with open(panoptic_categories) as handle:  # the sample's instances JSON also lists stuff: mark it
            isthing = {category["id"]: category.get("isthing", 1) for category in json.load(handle)}
        categories = [{**category, "isthing": isthing.get(category["id"], 1)} for category in categories]
    label_info = LabelInfo.from_coco_categories(categories)
    category_to_label = label_info.category_to_label
    per_image: dict[Any, list[dict[str, Any]]] = {image["id"]: [] for image in data["images"]}
    rows, skipped = [], []
    for annotation in data["annotations"]:
        if annotation["image_id"] not in per_image:
            _check_bad(
                f"{json_path}: annotation {annotation.get('id')} has unknown image id {annotation['image_id']}",
                on_bad_input,
                skipped,
            )
            continue
        per_image[annotation["image_id"]].append(annotation)
    for image in _progress(data["images"], f"reading {json_path.name}"):
        image_id = image["id"]
        image_path = root / split / image["file_name"]
        if not image_path.is_file():
            _check_bad(f"missing image {str(image_path)!r} for image id {image_id}", on_bad_input, skipped)
            continue
        annotations = per_image[image_id]
        unknown = sorted({a["category_id"] for a in annotations} - set(category_to_label))
        if unknown:
            _check_bad(f"{json_path}: image id {image_id} has unknown category ids {unknown}", on_bad_input, skipped)
            continue
        rows.append(
            {
                "image": {"path": str(image_path), "bytes": None},
                "annotation": None,
                "annotation_format": "coco_instance",
                "segment_ids": list(range(1, len(annotations) + 1)),
                "class_labels": [category_to_label[a["category_id"]] for a in annotations],
                "iscrowd": [bool(a.get("iscrowd", 0)) for a in annotations],
                "segmentations": [json.dumps(a["segmentation"]) for a in annotations],
                "image_id": str(image_id),
                "file_name": image["file_name"],
                "num_labels": label_info.num_labels,
            }
        )
    return rows, label_info, skipped


ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def ade20k_label_info(root: str | Path | None = None, num_labels: int = 150) -> LabelInfo:
    """ADE20K's 150 classes: names from ``objectInfo150.txt`` / ``.csv`` in the root when present, else those of the
    ADE20K checkpoints' configs, else numbers."""
    names = [f"class_{index}" for index in range(1, num_labels + 1)]
    # the ADE20K checkpoints' configs (package data) carry the 150 names, in the dataset's order
    packaged = (
        Path(__file__).resolve().parents[1] / "hub_configs" / "mask2former-swin-tiny-ade-semantic" / "config.json"
    )
    if num_labels == 150 and packaged.is_file():
        with open(packaged) as handle:
            id2label = json.load(handle).get("id2label", {})
        if len(id2label) == 150:
            names = [id2label[str(index)] for index in range(150)]
    if root is not None:
        for candidate in ("objectInfo150.txt", "objectInfo150.csv"):
            path = Path(root) / candidate
            if path.is_file():
                lines = path.read_text().splitlines()[1:]
                parsed = [line.split(",")[-1] if candidate.endswith("csv") else line.split("\t")[-1] for line in lines]
                parsed = [name.split(";")[0].strip().strip('"') for name in parsed if name.strip()]
                if len(parsed) == num_labels:
                    names = parsed
    return LabelInfo(
        id2label=dict(enumerate(names)), category_ids={label: label + 1 for label in range(num_labels)}, thing_ids=[]
    )


def ade20k_rows(
    root: str | Path, split: str, on_bad_input: str = "raise", num_labels: int = 150
) -> tuple[list[dict[str, Any]], LabelInfo, list[str]]:
    """Rows of an ADEChallengeData2016 root: ``images/<training|validation>/*.jpg`` with
    ``annotations/<...>/*.png`` (class value = label + 1, 0 = ignore)."""
    root = Path(root)
    if split not in ADE20K_SPLITS:
        raise ValueError(f"unknown ADE20K split {split!r}; use one of {sorted(ADE20K_SPLITS)}")
    folder = ADE20K_SPLITS[split]
    image_dir, annotation_dir = root / "images" / folder, root / "annotations" / folder
    if not image_dir.is_dir():
        raise ValueError(f"no ADE20K image folder {image_dir}")
    label_info = ade20k_label_info(root, num_labels)
    rows, skipped = [], []
    for image_path in _progress(sorted(image_dir.glob("*.jpg")), f"listing {image_dir}"):
        annotation_path = annotation_dir / f"{image_path.stem}.png"
        if not annotation_path.is_file():
            _check_bad(
                f"missing annotation {str(annotation_path)!r} for image {image_path.stem!r}", on_bad_input, skipped
            )
            continue
        rows.append(
            {
                "image": {"path": str(image_path), "bytes": None},
                "annotation": {"path": str(annotation_path), "bytes": None},
                "annotation_format": "semantic",
                "image_id": image_path.stem,
                "file_name": image_path.name,
                "label_offset": 1,
                "num_labels": num_labels,
                "ignore_value": None,
            }
        )
    if not rows and not skipped:
        raise ValueError(f"no images (*.jpg) in {image_dir}")
    return rows, label_info, skipped


# ---------------------------------------------------------------------------------------------------------------------
# Hub / parquet datasets
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_COLUMNS = {"image": "image", "annotation": "annotation", "segments_info": "segments_info", "image_id": None}


class _HubRowConverter:
    """A Hub row (user's column names) -> a stored row of our schema (picklable, used by map/with_transform)."""

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
        annotation = row[columns["annotation"]]
        return {
            "image": row[columns["image"]],
            "annotation": annotation,
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


class _HubDecoder:
    def __init__(self, converter: _HubRowConverter, decoder: _Decoder):
        self.converter = converter
        self.decoder = decoder

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        size = len(next(iter(batch.values())))
        records = [
            self.decoder.decode_one({key: values[index] for key, values in batch.items()}, self.converter)
            for index in range(size)
        ]
        records = [record if record is not None else _empty_record() for record in records]
        return {key: [record[key] for record in records] for key in records[0]}


class _StreamingHubDecoder:
    def __init__(self, converter: _HubRowConverter, decoder: _Decoder):
        self.converter = converter
        self.decoder = decoder

    def __call__(self, row: dict[str, Any], index: int) -> Record:
        record = self.decoder.decode_one(row, lambda raw: self.converter(raw, index))
        return record if record is not None else _empty_record()


def _hub_label_info(dataset, columns, annotation_format, id2label, categories) -> LabelInfo:
    if categories is not None:
        return LabelInfo.from_coco_categories(categories)
    if id2label is None and "semantic_class_to_id" in (dataset.column_names or []):
        # the transformers instance-segmentation example's layout: {name: class value} in every row, 0 = background
        first = dataset[0] if not isinstance(dataset, _require_datasets().IterableDataset) else next(iter(dataset))
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
    transform: Callable[[Record], Record] | None = None,
    on_bad_input: str = "raise",
    task: str = "panoptic",
    **load_kwargs: Any,
):
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
    datasets = _require_datasets()
    if annotation_format not in ("coco_panoptic", "semantic", "instance_channels"):
        raise ValueError(f"annotation_format {annotation_format!r} is not readable from the Hub")
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
    label_info = _hub_label_info(raw, columns, annotation_format, id2label, categories)
    if thing_ids is not None:
        category_to_label = label_info.category_to_label
        label_info.thing_ids = sorted(category_to_label[value] for value in thing_ids)
    if label_offset is None:
        label_offset = min(label_info.category_ids.values()) if annotation_format != "coco_panoptic" else 0
    if annotation_format != "coco_panoptic":
        expected = list(range(label_offset, label_offset + label_info.num_labels))
        if sorted(label_info.category_ids.values()) != expected:
            raise ValueError(f"class-map datasets need consecutive class values {expected[0]}..{expected[-1]}")
    converter = _HubRowConverter(columns, annotation_format, label_info, label_offset, ignore_value)
    # keep images undecoded: they are decoded by our decoder, lazily
    for column in (columns["image"], columns["annotation"]):
        if raw.features is not None and isinstance(raw.features.get(column), datasets.Image):
            raw = raw.cast_column(column, datasets.Image(decode=False))
    decoder = _Decoder(transform, on_bad_input)
    if streaming:
        mapped = raw.map(_StreamingHubDecoder(converter, decoder), with_indices=True, remove_columns=available)
        return _attach_info(mapped.filter(_not_skipped), label_info, task)
    if not columns.get("image_id"):
        raw = raw.add_column("__index__", list(range(len(raw))))
        converter.columns = {**columns, "image_id": "__index__"}
    dataset = raw.with_transform(_HubDecoder(converter, decoder))
    return _attach_info(dataset, label_info, task)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def load_dataset_for_segmentation(
    source: str | os.PathLike,
    split: str = "train",
    task: str = "panoptic",
    *,
    transform: Callable[[Record], Record] | None = None,
    on_bad_input: str = "raise",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_images: int | None = None,
    num_val_images: int | None = None,
    image_size: int | None = None,
    **hub_kwargs: Any,
):
    """Load a segmentation dataset as a 🤗 ``Dataset`` (or ``IterableDataset`` when streaming) of records.

    Args:
        source: a local COCO root, a local ADE20K root (ADEChallengeData2016), ``"synthetic-shapes"``, or a Hub id /
            local parquet folder (see ``load_hub_dataset`` for ``annotation_format``, ``column_mapping``,
            ``id2label``).
        split: ``"train"``/``"val"`` (COCO accepts ``train2017``/``val2017``; ADE20K ``training``/``validation``).
        task: ``"panoptic"`` (COCO panoptic JSON), ``"instance"`` (COCO instances JSON; for a root with only a
            panoptic JSON, its thing segments) or ``"semantic"`` (any of them: records give the class of each pixel).
        transform: ``record -> record`` applied after decoding (e.g. ``transforms.coco_lsj_transform()``).
        on_bad_input: ``"raise"`` (default) or ``"skip"`` (skipped examples are logged and counted).
        cache_dir, seed, num_images, num_val_images, image_size: for ``synthetic-shapes`` (default cache
            ``~/.cache/mask2former``).
        hub_kwargs: ``load_hub_dataset`` options (``annotation_format``, ``column_mapping``, ``id2label``, ...).

    Returns:
        The dataset; ``segmentation_label_info(dataset)`` gives its labels. Each item is a record (module docstring).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if on_bad_input not in ("raise", "skip"):
        raise ValueError(f"on_bad_input must be 'raise' or 'skip', got {on_bad_input!r}")
    source_text = str(source)
    if source_text == SYNTHETIC_SOURCE:
        from .synthetic import generate_synthetic_shapes

        synthetic_kwargs = {"seed": seed}
        if num_images is not None:
            synthetic_kwargs["num_images"] = num_images
        if image_size is not None:
            synthetic_kwargs["image_size"] = image_size
        if num_val_images is not None:
            synthetic_kwargs["num_val_images"] = num_val_images
        source = generate_synthetic_shapes(cache_dir, **synthetic_kwargs)
        source_text = str(source)
        task_for_files = "panoptic" if task != "instance" else "instance"
    else:
        task_for_files = task
    path = Path(source_text)
    is_local_root = path.is_dir() and (_is_ade_root(path) or (path / "annotations").is_dir())
    if is_local_root and hub_kwargs:
        raise ValueError(f"{sorted(hub_kwargs)} only apply to Hub / parquet datasets, not to the local root {path}")
    if path.is_dir() and _is_ade_root(path):
        if task != "semantic":
            raise ValueError(f"{path} is an ADE20K (semantic) root; use task='semantic'")
        rows, label_info, skipped = ade20k_rows(path, split, on_bad_input)
    elif path.is_dir() and (path / "annotations").is_dir():
        split_name = _coco_split_name(path, split)
        has_panoptic = (path / "annotations" / f"panoptic_{split_name}.json").is_file()
        has_instances = (path / "annotations" / f"instances_{split_name}.json").is_file()
        if task_for_files == "instance" and has_instances:
            rows, label_info, skipped = coco_instance_rows(path, split, on_bad_input)
        elif has_panoptic:
            # for the instance task the records keep every segment; collate and the metrics use the things
            rows, label_info, skipped = coco_panoptic_rows(path, split, on_bad_input)
        elif has_instances:
            rows, label_info, skipped = coco_instance_rows(path, split, on_bad_input)
        else:
            raise ValueError(
                f"COCO root {path} has neither annotations/panoptic_{split_name}.json nor "
                f"annotations/instances_{split_name}.json"
            )
    elif path.exists():
        if any(path.rglob("*.parquet")):
            return load_hub_dataset(
                str(path),
                split,
                streaming=streaming,
                transform=transform,
                on_bad_input=on_bad_input,
                task=task,
                **hub_kwargs,
            )
        raise ValueError(
            f"{path} is neither a COCO root (with annotations/), an ADE20K root (with images/training or "
            "images/validation) nor a folder of parquet files"
        )
    else:
        return load_hub_dataset(
            source_text,
            split,
            streaming=streaming,
            transform=transform,
            on_bad_input=on_bad_input,
            task=task,
            **hub_kwargs,
        )
    _SKIPPED.extend(skipped)
    if skipped:
        logger.warning("%d example(s) of %s skipped; see skipped_examples()", len(skipped), path)
    if not rows:
        raise ValueError(f"no usable examples in {path} (split {split!r})")
    dataset = _rows_to_dataset(rows, label_info, task)
    if streaming:
        # several shards so that DataLoader workers can split the stream
        dataset = dataset.to_iterable_dataset(num_shards=min(len(dataset), 64))
        mapped = dataset.map(
            _SingleRowDecoder(_Decoder(transform, on_bad_input)), remove_columns=list(_features_names())
        )
        return _attach_info(mapped.filter(_not_skipped), label_info, task)
    return dataset.with_transform(_Decoder(transform, on_bad_input))


def _features_names() -> list[str]:
    return list(_features(_require_datasets()))


def semantic_label_map(record: Record, ignore_label: int = 255) -> np.ndarray:
    """A record -> ``(H, W)`` int64 map of label ids, ``ignore_label`` where void (crowd regions keep their class)."""
    segment_map = np.asarray(record["segment_map"])
    lookup_ids = np.asarray([0, *record["segment_ids"]], dtype=np.int64)
    lookup_labels = np.asarray([ignore_label, *record["class_labels"]], dtype=np.int64)
    order = np.argsort(lookup_ids)
    positions = np.searchsorted(lookup_ids[order], segment_map)
    positions = np.clip(positions, 0, len(order) - 1)
    found = lookup_ids[order][positions] == segment_map
    return np.where(found, lookup_labels[order][positions], ignore_label)
