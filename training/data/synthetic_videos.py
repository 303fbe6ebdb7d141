"""``synthetic-moving-shapes``: a small generated video instance segmentation set, written in YouTube-VIS format.

API
---
- ``generate_synthetic_moving_shapes(cache_dir=None, seed=0, num_train_videos=400, num_val_videos=32,
  num_frames=6, image_size=96) -> Path`` writes (once; later calls reuse it) a YouTube-VIS 2019 root: ``train.json``,
  ``valid.json`` and the frames ``{train,valid}/JPEGImages/<video>/<frame>.png`` under ``cache_dir`` (default
  ``~/.cache/mask2former``), and returns the root. The root is read by the same YouTube-VIS reader as real data
  (``load_video_dataset("synthetic-moving-shapes")``). Unlike the releases, ``valid.json`` carries its annotations,
  so video AP can be measured offline.
- ``SYNTHETIC_VIDEO_SOURCE``: the name (``"synthetic-moving-shapes"``) that stands for this set.
- ``SYNTHETIC_VIDEO_CATEGORIES``: 3 classes (circle, square, triangle), ids 1, 2, 3.

Each video: a smooth random background with noise, 1-3 shapes of random class, colour and size moving at constant
velocity; some enter after the first frame, some leave the frame, and later shapes are drawn over earlier ones, so a
mask can shrink, vanish behind another shape and reappear. A frame where an instance has no pixel is ``null`` in its
``segmentations``. Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ...utils.optional import require
from .synthetic import default_cache_dir

SYNTHETIC_VIDEO_SOURCE = "synthetic-moving-shapes"
SYNTHETIC_VIDEO_VERSION = 1
SYNTHETIC_VIDEO_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]


def _shape_mask(category: int, center: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Boolean `(size, size)` mask of a circle (1), square (2) or upward triangle (3) around ``center`` (y, x)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = rows - center[0], cols - center[1]
    if category == 1:
        return dy**2 + dx**2 <= radius**2
    if category == 2:
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    # triangle: apex at the top, base at the bottom
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient with noise: `(size, size, 3)` float in 0-255."""
    corners = rng.uniform(40, 215, size=(2, 2, 3))
    weights = np.linspace(0, 1, size)
    top = corners[0, 0] * (1 - weights[:, None]) + corners[0, 1] * weights[:, None]  # (size, 3) along x
    bottom = corners[1, 0] * (1 - weights[:, None]) + corners[1, 1] * weights[:, None]
    gradient = top[None] * (1 - weights[:, None, None]) + bottom[None] * weights[:, None, None]
    return gradient + rng.normal(0, 8, size=(size, size, 3))


def _render_video(rng: np.random.Generator, num_frames: int, size: int) -> tuple[list[np.ndarray], list[dict]]:
    """Frames `(size, size, 3)` uint8 and the instances ``{"category_id", "masks": (T, size, size) bool}``."""
    background = _background(rng, size)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(size * 0.08, size * 0.2))
        start = rng.uniform(0, size, 2)
        velocity = rng.uniform(-size * 0.08, size * 0.08, 2)
        first_frame = int(rng.integers(0, num_frames // 2 + 1)) if rng.random() < 0.3 else 0  # some enter late
        shapes.append(
            {
                "category_id": int(rng.integers(1, 4)),
                "radius": radius,
                "start": start,
                "velocity": velocity,
                "first_frame": first_frame,
                "colour": rng.uniform(0, 255, 3),
            }
        )
    frames = []
    visible = np.zeros((len(shapes), num_frames, size, size), dtype=bool)
    for frame in range(num_frames):
        image = background.copy()
        owner = np.full((size, size), -1)
        for index, shape in enumerate(shapes):  # later shapes are drawn over earlier ones
            if frame < shape["first_frame"]:
                continue
            center = shape["start"] + shape["velocity"] * (frame - shape["first_frame"])
            mask = _shape_mask(shape["category_id"], center, shape["radius"], size)
            owner[mask] = index
            shade = shape["colour"] + rng.normal(0, 6, size=(size, size, 3))
            image[mask] = shade[mask]
        for index in range(len(shapes)):
            visible[index, frame] = owner == index
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
    instances = [
        {"category_id": shape["category_id"], "masks": visible[index]}
        for index, shape in enumerate(shapes)
        if visible[index].any()
    ]
    return frames, instances


def _write_split(
    root: Path, split: str, rng: np.random.Generator, count: int, num_frames: int, size: int, first_id: int
) -> None:
    mask_utils = require("pycocotools.mask", "the synthetic-moving-shapes set (its RLE masks)")
    videos, annotations = [], []
    for video_index in range(count):
        video_id = first_id + video_index
        frames, instances = _render_video(rng, num_frames, size)
        folder = root / split / "JPEGImages" / f"{video_id:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        file_names = []
        for frame_index, frame in enumerate(frames):
            Image.fromarray(frame).save(folder / f"{frame_index:05d}.png")
            file_names.append(f"{video_id:05d}/{frame_index:05d}.png")
        videos.append({"id": video_id, "width": size, "height": size, "length": num_frames, "file_names": file_names})
        for instance_index, instance in enumerate(instances):
            segmentations, areas, boxes = [], [], []
            for mask in instance["masks"]:
                if not mask.any():
                    segmentations.append(None)
                    areas.append(None)
                    boxes.append(None)
                    continue
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                areas.append(float(mask_utils.area(rle)))
                boxes.append([float(v) for v in mask_utils.toBbox(rle)])
                rle["counts"] = rle["counts"].decode("ascii")
                segmentations.append(rle)
            annotations.append(
                {
                    "id": video_id * 10 + instance_index,  # at most 3 instances a video
                    "video_id": video_id,
                    "category_id": instance["category_id"],
                    "iscrowd": 0,
                    "segmentations": segmentations,
                    "areas": areas,
                    "bboxes": boxes,
                }
            )
    payload = {
        "info": {"description": f"synthetic-moving-shapes v{SYNTHETIC_VIDEO_VERSION}"},
        "licenses": [],
        "videos": videos,
        "categories": SYNTHETIC_VIDEO_CATEGORIES,
        "annotations": annotations,
    }
    (root / f"{split}.json").write_text(json.dumps(payload))


def generate_synthetic_moving_shapes(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    num_train_videos: int = 400,
    num_val_videos: int = 32,
    num_frames: int = 6,
    image_size: int = 96,
) -> Path:
    """Writes the set once under ``cache_dir`` and returns its root (reused when the same options ask again)."""
    if image_size < 32 or num_frames < 1 or num_train_videos < 1 or num_val_videos < 1:
        raise ValueError(
            f"synthetic-moving-shapes needs image_size >= 32, num_frames >= 1 and at least one video per split; got "
            f"image_size={image_size}, num_frames={num_frames}, {num_train_videos} train / {num_val_videos} val."
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = (
        f"{SYNTHETIC_VIDEO_SOURCE}-v{SYNTHETIC_VIDEO_VERSION}-seed{seed}-{num_train_videos}x{num_val_videos}"
        f"-t{num_frames}-{image_size}px"
    )
    root = cache / name
    if (root / "valid.json").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    # write into a temporary folder and rename, so that an interrupted run never leaves a half-written set
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        rng = np.random.default_rng(seed)
        _write_split(staging, "train", rng, num_train_videos, num_frames, image_size, first_id=1)
        _write_split(staging, "valid", rng, num_val_videos, num_frames, image_size, first_id=num_train_videos + 1)
        staging.rename(root)
    except FileExistsError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


__all__ = [
    "SYNTHETIC_VIDEO_CATEGORIES",
    "SYNTHETIC_VIDEO_SOURCE",
    "generate_synthetic_moving_shapes",
]
