"""Clip augmentation: one random draw per clip, applied alike to every frame and its masks (the original's
``flip_by_clip`` / ``choice_by_clip``).

Each transform is ``(record, rng) -> record`` on a ``VideoClipRecord`` (``frames``: T `(H, W, 3)` uint8 arrays,
``masks``: `(N, T, H, W)` bool); ``rng`` is the clip's own ``numpy.random.Generator`` (``VideoClipDataset`` derives it
from the seed, the epoch and the index, so runs are reproducible in DataLoader workers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .youtube_vis import VideoClipRecord


class ClipFlip:
    """Horizontal flip of the whole clip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.prob = prob

    def __call__(self, record: VideoClipRecord, rng: np.random.Generator) -> VideoClipRecord:
        if rng.random() >= self.prob:
            return record
        return {
            **record,
            "frames": [np.ascontiguousarray(frame[:, ::-1]) for frame in record["frames"]],
            "masks": np.ascontiguousarray(record["masks"][..., ::-1]),
        }


class ClipResizeShortestEdge:
    """Resize a clip so its shortest edge is one of ``min_sizes`` (drawn once per clip), the longest at most
    ``max_size`` (bilinear, antialiased, for frames; nearest for masks)."""

    def __init__(self, min_sizes: Sequence[int], max_size: int = 1333) -> None:
        if not min_sizes or min(min_sizes) < 1:
            raise ValueError(f"min_sizes must hold positive sizes, got {list(min_sizes)}.")
        self.min_sizes = list(min_sizes)
        self.max_size = max_size

    def __call__(self, record: VideoClipRecord, rng: np.random.Generator) -> VideoClipRecord:
        height, width = record["frames"][0].shape[:2]
        short = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        if size == (height, width):
            return record
        # (T, H, W, 3) -> (T, 3, H, W) -> resized -> (T, H', W', 3)
        frames = torch.from_numpy(np.stack(record["frames"])).permute(0, 3, 1, 2).float()
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
        frames = frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        masks = torch.from_numpy(record["masks"]).float()
        if masks.shape[0]:
            masks = F.interpolate(masks, size=size, mode="nearest-exact") > 0.5
        else:
            masks = masks.new_zeros(0, masks.shape[1], *size).bool()
        return {**record, "frames": list(frames), "masks": masks.numpy()}


class ClipCompose:
    """Applies clip transforms in order, all with the clip's generator."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, record: VideoClipRecord, rng: np.random.Generator) -> VideoClipRecord:
        for transform in self.transforms:
            record = transform(record, rng)
        return record


__all__ = ["ClipCompose", "ClipFlip", "ClipResizeShortestEdge"]
