"""YouTube-VIS 2019 / 2021 and OVIS readers: a video instance segmentation json + frame folders -> a 🤗 dataset of
videos, and the clips training and evaluation read from it.

API
---
- ``load_video_dataset(source, split="train", ...) -> VideoData``: ``source`` is a dataset root in one of the
  releases' layouts (below), ``"synthetic-moving-shapes"``, or a json file (frames under ``image_root``).
- ``VideoData``: ``dataset`` (a ``datasets.Dataset``, one row per video: ``video_id``, ``height``, ``width``,
  ``file_names`` (absolute), ``instances``: ``[{"id", "label", "iscrowd", "segmentations": [per frame: json text of
  the RLE / polygons, "" when absent]}]``), ``label_info`` (categories in increasing id order -> labels 0..K-1),
  ``annotation_file`` (the json, the ground truth video AP is scored against).
- ``sample_training_frames(video_length, num_frames, frame_range, rng)``: the original's training clip rule.
- ``VideoClipDataset(data, num_frames, frame_range, training, transform, seed)``: a torch dataset of clip records
  (``frames``, ``masks`` ``(N, T, H, W)``, ``class_labels``, ``video_id``, ``frame_indices``).

Layouts (the original repository's ``datasets/README.md``)::

    ytvis_2019/ or ytvis_2021/: {train,valid,test}.json, {train,valid,test}/JPEGImages/<video>/<frame>.jpg
    ytvis_2021 as released:     {train,valid,test}/instances.json, {train,valid,test}/JPEGImages/...
    ovis/:                      annotations/annotations_{train,valid,test}.json, {train,valid,test}/<video>/<frame>

A frame's segmentation may be compressed RLE, uncompressed RLE, polygons, or ``null`` (the instance is absent).
The valid / test jsons of the releases carry no annotations (their AP comes from the challenge server).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from ...processing.image_io import read_image
from ...utils.optional import require
from .records import LabelInfo
from .synthetic_videos import SYNTHETIC_VIDEO_SOURCE, generate_synthetic_moving_shapes

SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


@dataclass
class VideoData:
    """A loaded video dataset: one row per video, its labels, and the json it came from."""

    dataset: Any
    label_info: LabelInfo
    annotation_file: Path


class VideoClipRecord(TypedDict):
    """A clip as the video collator reads it.

    Keys:
        frames: T frames, `(H, W, 3)` uint8 arrays, one size.
        masks: `(N, T, H, W)` bool tubes of the instances present in at least one of the frames (crowd left out).
        class_labels: label (0..K-1) of each tube.
        instance_ids: the annotation id of each tube.
        video_id: the video's id in the json.
        frame_indices: which frames of the video the clip holds.
    """

    frames: list[np.ndarray]
    masks: np.ndarray
    class_labels: list[int]
    instance_ids: list[int]
    video_id: int
    frame_indices: list[int]


def _annotation_layouts(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(json, frame root) candidates of the releases' layouts, in the order they are tried."""
    return [
        (root / f"{split}.json", root / split / "JPEGImages"),
        (root / split / "instances.json", root / split / "JPEGImages"),
        (root / "annotations" / f"annotations_{split}.json", root / split),
        (root / "annotations" / f"instances_{split}.json", root / split / "JPEGImages"),
    ]


def resolve_video_source(
    source: str | os.PathLike, split: str, image_root: str | os.PathLike | None
) -> tuple[Path, Path]:
    """The annotation json and the folder its ``file_names`` are relative to."""
    path = Path(source)
    if path.is_file():
        if image_root is None:
            raise ValueError(f"{path} is a json file: pass image_root=<the folder its file_names are relative to>.")
        return path, Path(image_root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is neither a YouTube-VIS / OVIS root nor a json file (or the name {SYNTHETIC_VIDEO_SOURCE!r})."
        )
    for annotation_file, frames in _annotation_layouts(path, split):
        if annotation_file.is_file():
            return annotation_file, Path(image_root) if image_root is not None else frames
    tried = ", ".join(str(candidate.relative_to(path)) for candidate, _ in _annotation_layouts(path, split))
    raise FileNotFoundError(f"{path} has no {split!r} annotations; looked for {tried}.")


def _frame_text(segmentation: Any) -> str:
    return "" if segmentation is None else json.dumps(segmentation)


def video_rows(annotation_file: Path, image_root: Path) -> tuple[list[dict[str, Any]], LabelInfo]:
    """The json -> one row per video (see the module docstring) and the labels."""
    with open(annotation_file) as handle:
        data = json.load(handle)
    for key in ("videos", "categories"):
        if key not in data:
            raise ValueError(f"{annotation_file} has no {key!r}: it is not a YouTube-VIS / OVIS json.")
    label_info = LabelInfo.from_coco_categories(data["categories"])
    label_of = label_info.category_to_label
    instances_of: dict[Any, list[dict[str, Any]]] = {video["id"]: [] for video in data["videos"]}
    for annotation in data.get("annotations", []):
        video_id = annotation["video_id"]
        if video_id not in instances_of:
            raise ValueError(
                f"{annotation_file}: annotation {annotation.get('id')} names video {video_id}, not listed."
            )
        if annotation["category_id"] not in label_of:
            raise ValueError(
                f"{annotation_file}: annotation {annotation.get('id')} has category {annotation['category_id']}, "
                "which is not in categories."
            )
        instances_of[video_id].append(
            {
                "id": int(annotation["id"]),
                "label": label_of[annotation["category_id"]],
                "iscrowd": bool(annotation.get("iscrowd", 0)),
                "segmentations": [_frame_text(segmentation) for segmentation in annotation["segmentations"]],
            }
        )
    rows = []
    for video in data["videos"]:
        file_names = [str(image_root / name) for name in video["file_names"]]
        for instance in instances_of[video["id"]]:
            if len(instance["segmentations"]) != len(file_names):
                raise ValueError(
                    f"{annotation_file}: annotation {instance['id']} has {len(instance['segmentations'])} frame "
                    f"segmentations but video {video['id']} has {len(file_names)} frames."
                )
        rows.append(
            {
                "video_id": int(video["id"]),
                "height": int(video["height"]),
                "width": int(video["width"]),
                "file_names": file_names,
                "instances": instances_of[video["id"]],
            }
        )
    return rows, label_info


def load_video_dataset(
    source: str | os.PathLike,
    split: str = "train",
    *,
    image_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_train_videos: int | None = None,
    num_val_videos: int | None = None,
    num_frames: int | None = None,
    image_size: int | None = None,
) -> VideoData:
    """Load a YouTube-VIS 2019 / 2021 / OVIS split (or the generated ``synthetic-moving-shapes``) as a 🤗 dataset.

    Args:
        source: a dataset root, a json file (with ``image_root``), or ``"synthetic-moving-shapes"``.
        split: ``"train"``, ``"valid"`` (``"val"``) or ``"test"``.
        image_root: the folder the json's ``file_names`` are relative to (default: the layout's).
        cache_dir, seed, num_train_videos, num_val_videos, num_frames, image_size: for ``synthetic-moving-shapes``
            (see ``generate_synthetic_moving_shapes``).

    Returns:
        ``VideoData`` with the dataset (one row per video), its labels and the json path.
    """
    datasets = require("datasets", "video datasets")
    split = SPLIT_ALIASES.get(split, split)
    if str(source) == SYNTHETIC_VIDEO_SOURCE:
        options = {
            "num_train_videos": num_train_videos,
            "num_val_videos": num_val_videos,
            "num_frames": num_frames,
            "image_size": image_size,
        }
        source = generate_synthetic_moving_shapes(
            cache_dir, seed=seed, **{key: value for key, value in options.items() if value is not None}
        )
    annotation_file, frames_root = resolve_video_source(source, split, image_root)
    rows, label_info = video_rows(annotation_file, frames_root)
    features = datasets.Features(
        {
            "video_id": datasets.Value("int64"),
            "height": datasets.Value("int32"),
            "width": datasets.Value("int32"),
            "file_names": datasets.Sequence(datasets.Value("string")),
            "instances": [
                {
                    "id": datasets.Value("int64"),
                    "label": datasets.Value("int32"),
                    "iscrowd": datasets.Value("bool"),
                    "segmentations": datasets.Sequence(datasets.Value("string")),
                }
            ],
        }
    )
    return VideoData(datasets.Dataset.from_list(rows, features=features), label_info, annotation_file)


def sample_training_frames(
    video_length: int, num_frames: int, frame_range: int, rng: np.random.Generator, shuffle: bool = False
) -> list[int]:
    """The original's training clip: a random reference frame plus ``num_frames - 1`` frames drawn (with
    replacement) from the others within ``frame_range`` of it, in temporal order (shuffled with ``shuffle``)."""
    reference = int(rng.integers(video_length))
    start, end = max(0, reference - frame_range), min(video_length, reference + frame_range + 1)
    others = [index for index in range(start, end) if index != reference]
    if not others:  # a one-frame video: the clip repeats its frame
        others = [reference]
    chosen = [int(index) for index in rng.choice(others, num_frames - 1)] + [reference]
    chosen.sort()
    if shuffle:
        rng.shuffle(chosen)
    return chosen


def frame_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """One frame's annotation (compressed / uncompressed RLE, polygons, or None) -> compressed RLE, or None."""
    if segmentation is None:
        return None
    mask_utils = require("pycocotools.mask", "YouTube-VIS masks")
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        if not segmentation:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, *segmentation["size"])
    if isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        return {
            "size": list(segmentation["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    raise ValueError(
        f"a frame's segmentation must be an RLE dict, a polygon list or null, got {type(segmentation).__name__}."
    )


def decode_tubes(
    row: dict[str, Any], frame_indices: list[int], keep_crowd: bool = False
) -> tuple[np.ndarray, list[int], list[int]]:
    """A video row's instances on the chosen frames -> `(N, T, H, W)` bool tubes, labels, annotation ids.

    Instances with no pixel in any chosen frame are dropped (as the original's target preparation does), and crowd
    instances unless ``keep_crowd``.
    """
    mask_utils = require("pycocotools.mask", "YouTube-VIS masks")
    height, width = int(row["height"]), int(row["width"])
    tubes, labels, ids = [], [], []
    for instance in row["instances"]:
        if instance["iscrowd"] and not keep_crowd:
            continue
        tube = np.zeros((len(frame_indices), height, width), dtype=bool)
        for position, frame in enumerate(frame_indices):
            text = instance["segmentations"][frame]
            if not text:
                continue
            rle = frame_rle(json.loads(text), height, width)
            if rle is not None:
                tube[position] = mask_utils.decode(rle).astype(bool)
        if tube.any():
            tubes.append(tube)
            labels.append(int(instance["label"]))
            ids.append(int(instance["id"]))
    masks = np.stack(tubes) if tubes else np.zeros((0, len(frame_indices), height, width), dtype=bool)
    return masks, labels, ids


def read_frames(file_names: list[str], frame_indices: list[int]) -> list[np.ndarray]:
    """The chosen frames as `(H, W, 3)` uint8 arrays."""
    frames = []
    for index in frame_indices:
        path = file_names[index]
        try:
            frames.append(np.asarray(read_image(path, what=f"frame {index}")))
        except (OSError, ValueError) as error:
            raise OSError(f"cannot read frame {index} of the video: {path} ({error})") from error
    return frames


class VideoClipDataset(torch.utils.data.Dataset):
    """Clips of a ``VideoData`` dataset: T sampled frames with their instance tubes.

    Args:
        data: ``load_video_dataset``'s result (or its ``dataset``).
        num_frames: frames per training clip (``None``: every frame of the video, for inference).
        frame_range: training frames are drawn within this distance of a random reference frame.
        training: sample clips (``sample_training_frames``) instead of reading whole videos.
        transform: ``record -> record`` applied to each clip (e.g. ``ClipFlip``), the same for all its frames.
        seed: clip sampling is drawn from ``(seed, epoch, index)``; ``set_epoch`` changes the clips of an epoch.
    """

    def __init__(
        self,
        data: VideoData | Any,
        num_frames: int | None = 2,
        frame_range: int = 20,
        training: bool = True,
        transform: Any = None,
        seed: int = 0,
    ) -> None:
        self.dataset = data.dataset if isinstance(data, VideoData) else data
        if training and (num_frames is None or num_frames < 1):
            raise ValueError(f"training clips need num_frames >= 1, got {num_frames}.")
        self.num_frames = num_frames
        self.frame_range = frame_range
        self.training = training
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> VideoClipRecord:
        row = self.dataset[int(index)]
        video_length = len(row["file_names"])
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        if self.training:
            frame_indices = sample_training_frames(video_length, self.num_frames, self.frame_range, rng)
        else:
            frame_indices = list(
                range(video_length if self.num_frames is None else min(self.num_frames, video_length))
            )
        masks, labels, ids = decode_tubes(row, frame_indices)
        record: VideoClipRecord = {
            "frames": read_frames(row["file_names"], frame_indices),
            "masks": masks,
            "class_labels": labels,
            "instance_ids": ids,
            "video_id": int(row["video_id"]),
            "frame_indices": frame_indices,
        }
        if self.transform is not None:
            record = self.transform(record, rng)
        return record


__all__ = [
    "VideoClipDataset",
    "VideoClipRecord",
    "VideoData",
    "decode_tubes",
    "frame_rle",
    "load_video_dataset",
    "read_frames",
    "resolve_video_source",
    "sample_training_frames",
    "video_rows",
]
