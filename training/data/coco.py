"""COCO roots: the panoptic and the instance annotations, listed into stored rows and decoded into segments.

A COCO root holds ``<split>/`` images (``val2017/``; ``split`` may be given as ``val``) and ``annotations/`` with
``panoptic_<split>.json`` + the ``panoptic_<split>/`` PNG folder, and/or ``instances_<split>.json`` (RLE or polygon
masks). ``synthetic-shapes`` is written in this layout and read by this code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...utils.optional import require
from .records import (
    BadExampleError,
    LabelInfo,
    Segments,
    keep_visible_segments,
    listing_progress,
    report_bad_example,
    rgb_to_id,
    stored_file,
)


def is_coco_root(root: Path) -> bool:
    return root.is_dir() and (root / "annotations").is_dir()


def coco_split_name(root: Path, split: str) -> str:
    """``train``/``val`` or ``train2017``/``val2017`` -> the folder name present under ``root``."""
    if (root / split).is_dir():
        return split
    for candidate in (f"{split}2017", f"{split}2014"):
        if (root / candidate).is_dir():
            return candidate
    raise ValueError(f"no image folder for split {split!r} under COCO root {root} (expected {root / split}/)")


def _annotation_json(root: Path, split: str, kind: str) -> Path | None:
    """``annotations/<kind>_<split>.json`` of a COCO root, or None when the split or the file is not there."""
    try:
        path = root / "annotations" / f"{kind}_{coco_split_name(root, split)}.json"
    except ValueError:
        return None
    return path if path.is_file() else None


def coco_has_split(root: Path, split: str) -> bool:
    """Whether ``split`` has images and panoptic or instance annotations under ``root``."""
    return any(_annotation_json(root, split, kind) is not None for kind in ("panoptic", "instances"))


def coco_instance_annotations(root: Path, split: str) -> Path | None:
    """The instances JSON of ``split`` (the exact, overlapping instance masks COCO's mask AP is scored against)."""
    return _annotation_json(root, split, "instances")


def coco_rows(root: Path, split: str, task: str, on_bad_input: str) -> tuple[list[dict], LabelInfo, list[str]]:
    """Rows of the annotation file that serves ``task``: the instances JSON for ``"instance"`` when there is one
    (else the panoptic JSON, whose thing segments the collator and the metrics use), the panoptic JSON otherwise."""
    panoptic = _annotation_json(root, split, "panoptic")
    instances = _annotation_json(root, split, "instances")
    if task == "instance" and instances is not None:
        return coco_instance_rows(root, split, on_bad_input)
    if panoptic is not None:
        return coco_panoptic_rows(root, split, on_bad_input)
    if instances is not None:
        return coco_instance_rows(root, split, on_bad_input)
    split_name = coco_split_name(root, split)
    raise ValueError(
        f"COCO root {root} has neither annotations/panoptic_{split_name}.json nor "
        f"annotations/instances_{split_name}.json"
    )


def _load_json(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        data = json.load(handle)
    if not data.get("annotations"):
        raise ValueError(f"{path} has an empty annotation list: nothing to load")
    return data


def coco_panoptic_rows(
    root: str | Path, split: str, on_bad_input: str = "raise"
) -> tuple[list[dict[str, Any]], LabelInfo, list[str]]:
    """Rows of a COCO panoptic root (``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/``).

    Returns ``(rows, label_info, skipped)``; checks what can be checked without decoding images (files exist,
    category ids known, ids unique); PNG content is checked when a record is decoded.
    """
    root = Path(root)
    split = coco_split_name(root, split)
    json_path = root / "annotations" / f"panoptic_{split}.json"
    png_dir = root / "annotations" / f"panoptic_{split}"
    data = _load_json(json_path)
    label_info = LabelInfo.from_coco_categories(data["categories"])
    category_to_label = label_info.category_to_label
    images = {image["id"]: image for image in data["images"]}
    rows, skipped = [], []
    annotated = {annotation["image_id"] for annotation in data["annotations"]}
    for image_id in images:
        if image_id not in annotated:
            report_bad_example(f"{json_path}: image id {image_id} has no panoptic annotation", on_bad_input, skipped)
    for annotation in listing_progress(data["annotations"], f"reading {json_path.name}"):
        image_id = annotation["image_id"]
        image = images.get(image_id)
        if image is None:
            message = f"{json_path}: annotation {annotation['file_name']!r} has unknown image id {image_id}"
            report_bad_example(message, on_bad_input, skipped)
            continue
        image_path = root / split / image["file_name"]
        png_path = png_dir / annotation["file_name"]
        missing = [str(path) for path in (image_path, png_path) if not path.is_file()]
        if missing:
            report_bad_example(f"missing file(s) {missing} for image id {image_id}", on_bad_input, skipped)
            continue
        segments = annotation["segments_info"]
        unknown = sorted({s["category_id"] for s in segments} - set(category_to_label))
        ids = [int(s["id"]) for s in segments]
        if unknown:
            message = f"{json_path}: image id {image_id} has unknown category ids {unknown}"
            report_bad_example(message, on_bad_input, skipped)
            continue
        if len(set(ids)) != len(ids) or 0 in ids:
            message = f"{json_path}: image id {image_id} has repeated or zero segment ids"
            report_bad_example(message, on_bad_input, skipped)
            continue
        rows.append(
            {
                "image": stored_file(image_path),
                "annotation": stored_file(png_path),
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
    split = coco_split_name(root, split)
    json_path = root / "annotations" / f"instances_{split}.json"
    data = _load_json(json_path)
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
            message = f"{json_path}: annotation {annotation.get('id')} has unknown image id {annotation['image_id']}"
            report_bad_example(message, on_bad_input, skipped)
            continue
        per_image[annotation["image_id"]].append(annotation)
    for image in listing_progress(data["images"], f"reading {json_path.name}"):
        image_id = image["id"]
        image_path = root / split / image["file_name"]
        if not image_path.is_file():
            report_bad_example(f"missing image {str(image_path)!r} for image id {image_id}", on_bad_input, skipped)
            continue
        annotations = per_image[image_id]
        unknown = sorted({a["category_id"] for a in annotations} - set(category_to_label))
        if unknown:
            message = f"{json_path}: image id {image_id} has unknown category ids {unknown}"
            report_bad_example(message, on_bad_input, skipped)
            continue
        rows.append(
            {
                "image": stored_file(image_path),
                "annotation": None,
                "annotation_format": "coco_instance",
                "segment_ids": list(range(1, len(annotations) + 1)),
                "class_labels": [category_to_label[a["category_id"]] for a in annotations],
                "iscrowd": [bool(a.get("iscrowd", 0)) for a in annotations],
                # with the annotation id, so that a bad mask is named when it is decoded
                "segmentations": [
                    json.dumps({"id": a.get("id"), "segmentation": a.get("segmentation")}) for a in annotations
                ],
                "image_id": str(image_id),
                "file_name": image["file_name"],
                "num_labels": label_info.num_labels,
            }
        )
    return rows, label_info, skipped


def _visible(segment_map: np.ndarray, row: dict[str, Any], present: set[int]) -> Segments:
    """The row's stored segment lists cut down to the segments with pixels in ``segment_map``."""
    listed = {
        "segment_map": segment_map,
        "segment_ids": [int(value) for value in row["segment_ids"]],
        "class_labels": [int(value) for value in row["class_labels"]],
        "iscrowd": [bool(value) for value in row["iscrowd"]],
    }
    # a listed segment without pixels labels nothing: leave it out so that the lists match the map
    kept = keep_visible_segments(listed, present)
    return segment_map, kept["segment_ids"], kept["class_labels"], kept["iscrowd"]


def panoptic_segments(row: dict[str, Any], annotation: Image.Image, name: str, image_id: str) -> Segments:
    """A COCO panoptic PNG (ids as RGB colours) + the row's segments_info lists -> segments."""
    segment_map = rgb_to_id(np.asarray(annotation.convert("RGB")))
    present = set(np.unique(segment_map).tolist()) - {0}
    unknown = present - {int(value) for value in row["segment_ids"]}
    if unknown:
        raise BadExampleError(
            f"annotation {name!r} of image {image_id!r} has segment ids {sorted(unknown)} that its segments_info "
            "does not list"
        )
    return _visible(segment_map, row, present)


def instance_segments(row: dict[str, Any], height: int, width: int, image_id: str) -> Segments:
    """COCO instance annotations (RLE or polygons, JSON strings) -> segments, larger instances painted first.

    Where instances overlap, the smaller one wins the pixel (it would otherwise vanish); the metrics read instance
    ground truth from the JSON, so this only affects training targets. Each mask is validated before pycocotools
    sees it (``BadExampleError`` naming the image and the annotation): pycocotools raises bare exceptions for
    degenerate polygons and decodes an RLE whose counts do not cover the image from uninitialised memory.
    """
    mask_utils = require("pycocotools.mask", "decoding COCO instance masks")
    segment_ids = [int(value) for value in row["segment_ids"]]
    masks = []
    for text, segment_id in zip(row["segmentations"], segment_ids):
        stored = json.loads(text)
        annotation_id = stored.get("id", segment_id)
        where = f"instance annotation {annotation_id} of image {image_id!r} ({row.get('file_name')})"
        rle = _validated_rle(mask_utils, stored.get("segmentation"), height, width, where)
        masks.append(mask_utils.decode(rle).astype(bool))
    segment_map = np.zeros((height, width), dtype=np.int64)
    for index in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        segment_map[masks[index]] = segment_ids[index]
    return _visible(segment_map, row, set(np.unique(segment_map).tolist()))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _validated_rle(mask_utils, segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> a checked RLE pycocotools can decode."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise BadExampleError(f"{where} has an empty polygon list")
        for polygon in segmentation:
            valid = (
                isinstance(polygon, list)
                and len(polygon) >= 6
                and len(polygon) % 2 == 0
                and all(isinstance(value, (int, float)) and math.isfinite(value) for value in polygon)
            )
            if not valid:
                raise BadExampleError(
                    f"{where}: a polygon must be a list of at least 3 points as finite numbers x1, y1, x2, y2, ...; "
                    f"got {_short(polygon)}"
                )
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise BadExampleError(
            f"{where}: segmentation is neither polygons nor an RLE with counts and size: {_short(segmentation)}"
        )
    if list(segmentation["size"]) != [height, width]:
        raise BadExampleError(f"{where} is {segmentation['size']}, the image is {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(value, int) and value >= 0 for value in counts):
            raise BadExampleError(f"{where}: RLE counts must be non-negative integers, got {_short(counts)}")
        run_lengths = counts
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(counts, (str, bytes)):
        try:
            encoded = counts.encode("ascii") if isinstance(counts, str) else counts
        except UnicodeEncodeError as error:
            raise BadExampleError(f"{where}: the RLE counts string is not ASCII: {error}") from error
        run_lengths = _compressed_run_lengths(encoded, where)
        rle = {"size": [height, width], "counts": encoded}
    else:
        raise BadExampleError(f"{where}: RLE counts must be a list or a string, got {type(counts).__name__}")
    if sum(run_lengths) != height * width:
        raise BadExampleError(
            f"{where}: RLE counts cover {sum(run_lengths)} pixels, the image has {height}x{width} = {height * width}"
        )
    return rle


def _compressed_run_lengths(encoded: bytes, where: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string.

    Each number is written in 5-bit groups, least significant first, as characters ``48 + group`` with bit 5 set
    while more groups follow and bit 4 of the last group as the sign; from the fourth number on, a number is stored
    as its difference to the number two places before it.
    """
    run_lengths: list[int] = []
    position = 0
    while position < len(encoded):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(encoded):
                raise BadExampleError(f"{where}: the RLE counts string ends inside a number")
            group = encoded[position] - 48
            if not 0 <= group < 64:
                raise BadExampleError(
                    f"{where}: the RLE counts string has an invalid character {chr(encoded[position])!r}"
                )
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # negative: sign-extend
        if len(run_lengths) > 2:
            value += run_lengths[-2]
        if value < 0:
            raise BadExampleError(f"{where}: the RLE counts string decodes to a negative run length")
        run_lengths.append(value)
    return run_lengths
