"""ADE20K roots and class-map annotations: rows of an ``ADEChallengeData2016`` folder, and the two class-map formats
(``semantic``: one class value per pixel; ``instance_channels``: class and instance in two channels, the layout of
the transformers instance-segmentation example's ade20k-mini) that ADE20K and Hub datasets are decoded with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .records import BadExampleError, LabelInfo, Segments, listing_progress, report_bad_example, stored_file

ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
_PACKAGED_ADE20K_CONFIG = (
    Path(__file__).resolve().parents[2] / "hub_configs" / "mask2former-swin-tiny-ade-semantic" / "config.json"
)


def is_ade_root(root: Path) -> bool:
    return (root / "images" / "training").is_dir() or (root / "images" / "validation").is_dir()


def ade20k_has_split(root: Path, split: str) -> bool:
    return split in ADE20K_SPLITS and (root / "images" / ADE20K_SPLITS[split]).is_dir()


def ade20k_label_info(root: str | Path | None = None, num_labels: int = 150) -> LabelInfo:
    """ADE20K's 150 classes: names from ``objectInfo150.txt`` / ``.csv`` in the root when present, else those of the
    ADE20K checkpoints' configs, else numbers."""
    names = [f"class_{index}" for index in range(1, num_labels + 1)]
    # the ADE20K checkpoints' configs (package data) carry the 150 names, in the dataset's order
    if num_labels == 150 and _PACKAGED_ADE20K_CONFIG.is_file():
        with open(_PACKAGED_ADE20K_CONFIG) as handle:
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
    for image_path in listing_progress(sorted(image_dir.glob("*.jpg")), f"listing {image_dir}"):
        annotation_path = annotation_dir / f"{image_path.stem}.png"
        if not annotation_path.is_file():
            report_bad_example(
                f"missing annotation {str(annotation_path)!r} for image {image_path.stem!r}", on_bad_input, skipped
            )
            continue
        rows.append(
            {
                "image": stored_file(image_path),
                "annotation": stored_file(annotation_path),
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


def semantic_segments(row: dict[str, Any], annotation: Image.Image, name: str, image_id: str) -> Segments:
    """Class map with ``label = value - label_offset`` (ADE20K: offset 1, 0 = ignore) -> one segment per class
    present, segment id = label + 1 (0 = unlabeled)."""
    array = np.asarray(annotation)
    if array.ndim == 3:
        array = array[..., 0]
    array = array.astype(np.int64)
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
    segment_map = np.where(valid, labels + 1, 0).astype(np.int64)
    segment_ids = [int(value) for value in np.unique(segment_map) if value != 0]
    return segment_map, segment_ids, [value - 1 for value in segment_ids], [False] * len(segment_ids)


def instance_channel_segments(row: dict[str, Any], annotation: Image.Image, name: str, image_id: str) -> Segments:
    """ade20k-mini layout: channel 0 = class value, channel 1 = instance id (0 = none) -> segments."""
    array = np.asarray(annotation)
    if array.ndim != 3 or array.shape[-1] < 2:
        raise BadExampleError(
            f"annotation {name!r} of image {image_id!r} needs class and instance channels, got shape {array.shape}"
        )
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
            raise BadExampleError(
                f"annotation {name!r} of image {image_id!r} has unknown class value {pair_id // 256}"
            )
        segment_ids.append(index)
        class_labels.append(label)
    return segment_map, segment_ids, class_labels, [False] * len(segment_ids)
