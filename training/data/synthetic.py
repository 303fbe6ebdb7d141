"""``synthetic-shapes``: a small generated panoptic dataset, written as a COCO panoptic root.

API
---
- ``generate_synthetic_shapes(cache_dir=None, seed=0, num_images=32, num_val_images=8, image_size=128) -> Path``
  writes (once; later calls reuse it) ``train2017/``, ``val2017/``, ``annotations/panoptic_{train,val}2017.json`` and
  the panoptic PNG folders under ``cache_dir`` (default ``~/.cache/mask2former``), and returns the root. The root is
  then read by the same COCO-panoptic code as real data (``load_dataset_for_segmentation("synthetic-shapes")``).
- ``SYNTHETIC_SOURCE``: the name (``"synthetic-shapes"``) that stands for this set wherever a dataset is named.
- ``SYNTHETIC_CATEGORIES``: 3 thing classes (circle, square, triangle) and 3 stuff classes (sky, ground, water), with
  COCO-style ids that have gaps so that the id -> label remapping is exercised.

Each image is split into stuff bands (sky above, ground and/or water below, wavy borders) with overlapping thing
instances of random size and colour on top. Everything is drawn from ``numpy.random.default_rng(seed)``, so the same
seed gives the same files byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .records import id_to_rgb

SYNTHETIC_SOURCE = "synthetic-shapes"
SYNTHETIC_VERSION = 1
SYNTHETIC_CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1, "supercategory": "shape", "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "supercategory": "shape", "color": [0, 0, 142]},
    {"id": 3, "name": "triangle", "isthing": 1, "supercategory": "shape", "color": [250, 170, 30]},
    {"id": 10, "name": "sky", "isthing": 0, "supercategory": "background", "color": [70, 130, 180]},
    {"id": 11, "name": "ground", "isthing": 0, "supercategory": "background", "color": [152, 251, 152]},
    {"id": 12, "name": "water", "isthing": 0, "supercategory": "background", "color": [0, 80, 160]},
]
_STUFF_BASE_COLOURS = {10: (120, 170, 230), 11: (120, 100, 60), 12: (30, 70, 150)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MASK2FORMER_CACHE", Path.home() / ".cache" / "mask2former"))


def _thing_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one shape of random extent and position."""
    extent = int(rng.integers(max(size // 8, 4), max(size // 3, 6)))
    top, left = (int(value) for value in rng.integers(-extent // 3, size - extent // 2, size=2))
    rows, cols = np.mgrid[0:size, 0:size]
    if shape == "circle":
        radius = extent / 2
        return (rows - top - radius) ** 2 + (cols - left - radius) ** 2 <= radius**2
    if shape == "square":
        return (rows >= top) & (rows < top + extent) & (cols >= left) & (cols < left + extent)
    # triangle with a horizontal base: inside when below the apex lines
    apex_col = left + extent / 2
    inside_rows = (rows >= top) & (rows < top + extent)
    half_width = (rows - top) / 2
    return inside_rows & (np.abs(cols - apex_col) <= half_width)


def _render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image: ``(size, size, 3)`` uint8, ``(size, size)`` segment ids and their segments_info."""
    image = np.zeros((size, size, 3), dtype=np.float64)
    segment_map = np.zeros((size, size), dtype=np.int64)
    cols = np.arange(size)
    # stuff: sky above a wavy horizon, below it ground, water, or ground then water
    horizon = size * rng.uniform(0.3, 0.6) + size * 0.05 * np.sin(cols / size * rng.uniform(2, 8) + rng.uniform(0, 6))
    lower = [11, 12][int(rng.integers(0, 2))]
    bands = [(10, np.zeros(size), horizon)]
    if rng.uniform() < 0.5:
        shore = horizon + (size - horizon) * rng.uniform(0.3, 0.7)
        bands += [(11, horizon, shore), (12, shore, np.full(size, size))]
    else:
        bands += [(lower, horizon, np.full(size, size))]
    rows = np.arange(size)[:, None]
    segments = []
    for index, (category, start, end) in enumerate(bands):
        region = (rows >= start[None, :]) & (rows < end[None, :])
        segment_id = category * 1000 + index + 1
        segment_map[region] = segment_id
        colour = np.asarray(_STUFF_BASE_COLOURS[category]) + rng.normal(0, 12, size=3)
        image[region] = colour
        segments.append({"id": segment_id, "category_id": category, "iscrowd": 0})
    # things: overlapping shapes, later ones on top
    for index in range(int(rng.integers(1, 6))):
        category = int(rng.integers(1, 4))
        mask = _thing_mask(rng, SYNTHETIC_CATEGORIES[category - 1]["name"], size)
        segment_id = category * 1000 + 100 + index
        segment_map[mask] = segment_id
        image[mask] = rng.uniform(0, 255, size=3)
        segments.append({"id": segment_id, "category_id": category, "iscrowd": 0})
    image += rng.normal(0, 6, size=image.shape)  # texture so that the task is not pure colour lookup
    # segments fully covered by later shapes are not listed; the rest get area and bbox as COCO has them
    listed = []
    for segment in segments:
        mask = segment_map == segment["id"]
        area = int(mask.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        segment["area"] = area
        segment["bbox"] = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        listed.append(segment)
    return np.clip(image, 0, 255).astype(np.uint8), segment_map, listed


def _write_split(root: Path, split: str, rng: np.random.Generator, count: int, size: int, first_id: int) -> None:
    image_dir = root / split
    png_dir = root / "annotations" / f"panoptic_{split}"
    image_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    images, annotations = [], []
    for offset in range(count):
        image_id = first_id + offset
        stem = f"{image_id:012d}"
        image, segment_map, segments = _render_image(rng, size)
        Image.fromarray(image).save(image_dir / f"{stem}.png")  # lossless, so that re-reading is exact
        Image.fromarray(id_to_rgb(segment_map)).save(png_dir / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": size, "width": size})
        annotations.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})
    with open(root / "annotations" / f"panoptic_{split}.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": SYNTHETIC_CATEGORIES}, handle)


def generate_synthetic_shapes(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_images: int = 32,
    num_val_images: int = 8,
    image_size: int = 128,
) -> Path:
    """Write the ``synthetic-shapes`` COCO panoptic root (if not there yet) and return its path.

    Args:
        cache_dir: parent folder (default ``$MASK2FORMER_CACHE`` or ``~/.cache/mask2former``).
        seed: everything is drawn from this seed; the same arguments give the same files.
        num_images, num_val_images: images in ``train2017/`` and ``val2017/``.
        image_size: side of the square images, in pixels.
    """
    if num_images < 1 or num_val_images < 1 or image_size < 16:
        raise ValueError(
            f"synthetic-shapes needs num_images >= 1, num_val_images >= 1 and image_size >= 16, got "
            f"{num_images}, {num_val_images}, {image_size}"
        )
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"synthetic-shapes-v{SYNTHETIC_VERSION}-seed{seed}-n{num_images}-v{num_val_images}-s{image_size}"
    root = parent / name
    if (root / "annotations" / "panoptic_val2017.json").is_file():
        return root
    parent.mkdir(parents=True, exist_ok=True)
    # write to a temporary folder and rename: several processes (DataLoader workers, ranks) may race here
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        rng = np.random.default_rng(seed)
        _write_split(staging, "train2017", rng, num_images, image_size, first_id=1)
        _write_split(staging, "val2017", rng, num_val_images, image_size, first_id=1 + num_images)
        try:
            os.rename(staging, root)
        except OSError:
            if not (root / "annotations" / "panoptic_val2017.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root
