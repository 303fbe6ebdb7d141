"""Overlays of video instance results: each frame drawn by ``visualization.draw_instance_segmentation``, then laid
out as a strip of frames or written as an animated GIF / PNG.

An instance keeps its colour in every frame (colours depend on the label and the instance's rank within its label,
and the instance order is the same in every frame), so a tube can be followed through the clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .visualization import _to_numpy, draw_instance_segmentation


def draw_video_instances(
    frames: Sequence[Image.Image | np.ndarray],
    result: Mapping[str, Any],
    id2label: Mapping[int, str] | None = None,
    score_threshold: float = 0.5,
    alpha: float = 0.55,
    labelled: bool = True,
) -> list[Image.Image]:
    """One overlay per frame of a ``post_process_video_instance_segmentation`` result.

    Args:
        frames: the T frames, at the size the result was post-processed to.
        result: ``{"scores": (k,), "labels": (k,), "masks": (k, T, H, W)}``.
        id2label: class names (a model's ``config.id2label``).
        score_threshold: instances scoring below it are not drawn.

    Returns:
        `list[PIL.Image.Image]`: T RGB images.
    """
    masks = _to_numpy(result["masks"]).astype(bool)
    scores = _to_numpy(result["scores"]).astype(np.float64)
    labels = _to_numpy(result["labels"]).astype(np.int64)
    if masks.ndim != 4 or masks.shape[1] != len(frames):
        raise ValueError(
            f"result['masks'] must be (k, T, H, W) with T = {len(frames)} frames, got shape {tuple(masks.shape)}."
        )
    keep = scores >= score_threshold
    segments_info = [
        {"id": index, "label_id": int(label), "score": float(score)}
        for index, (label, score) in enumerate(zip(labels[keep], scores[keep]))
    ]
    kept = masks[keep]
    return [
        draw_instance_segmentation(frame, kept[:, index], segments_info, id2label, alpha, labelled)
        for index, frame in enumerate(frames)
    ]


def clip_strip(images: Sequence[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Frames side by side (``columns`` per row, default all in one row), separated by ``gap`` white pixels."""
    if not images:
        raise ValueError("clip_strip needs at least one frame.")
    width, height = images[0].size
    columns = len(images) if columns is None else max(1, columns)
    rows = -(-len(images) // columns)
    strip = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        strip.paste(image.convert("RGB"), (column * (width + gap), row * (height + gap)))
    return strip


def save_clip_animation(images: Sequence[Image.Image], path: str | Path, fps: float = 5.0) -> Path:
    """Writes the frames as an animated GIF (``.gif``) or PNG (``.png``, APNG) looping forever."""
    path = Path(path)
    if path.suffix.lower() not in (".gif", ".png"):
        raise ValueError(f"an animation is written as .gif or .png, got {path.name!r}.")
    if not images:
        raise ValueError("save_clip_animation needs at least one frame.")
    frames = [image.convert("RGB") for image in images]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


__all__ = ["clip_strip", "draw_video_instances", "save_clip_animation"]
