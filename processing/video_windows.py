"""Windowed inference for videos longer than one clip fits in memory: clips of N frames, queries matched across
windows by mask overlap.

The model's memory grows linearly with the frames of a clip (every frame's backbone and pixel-decoder maps, and T
times the keys in each cross-attention). ``windowed_video_outputs`` runs consecutive windows of ``window`` frames
that share ``overlap`` frames, and stitches them into one output for the whole video:

- the queries of each window are matched one-to-one to the previous window's by the soft IoU of their mask
  probabilities on the shared frames (on the last / first frame when ``overlap`` is 0), with the Hungarian algorithm;
- a query's tube is the concatenation of its matched tubes (shared frames taken from the earlier window);
- its class probabilities are the frame-weighted mean over the windows, returned as logits (their log).

The result has the model's output fields, so ``post_process_video_instance_segmentation`` takes it as it is.

Limits: an object absent from the shared frames gives its query nothing to be matched by, so its identity may
switch between windows; an object that leaves and comes back is followed only through its query's slot; a window
never sees past its own frames (the whole-clip model does); the stitched tubes are held in full, ``Q x T x H/4 x
W/4`` floats (for 100 queries, 1000 frames at 384 x 640 input: 6.1 GB), so very long videos need few queries or
top-k pruning after the fact.
"""

from __future__ import annotations

from typing import Any

import torch
from scipy.optimize import linear_sum_assignment


def soft_iou(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`(Q, F, h, w)` mask probabilities of two windows on the same frames -> `(Q, Q)` soft IoU."""
    previous, current = previous.flatten(1), current.flatten(1)  # (Q, F*h*w)
    intersection = previous @ current.T
    union = previous.sum(1)[:, None] + current.sum(1)[None, :] - intersection
    return intersection / union.clamp_min(1e-6)


@torch.no_grad()
def windowed_video_outputs(
    model: Any,
    pixel_values_video: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    window: int = 10,
    overlap: int = 1,
) -> dict[str, torch.Tensor]:
    """The model on a long video, window by window, stitched into one prediction.

    Args:
        model: a ``VideoMask2FormerForVideoSegmentation`` (in eval mode).
        pixel_values_video: `(T, 3, H, W)` or `(1, T, 3, H, W)`, one video as the processor gives it.
        pixel_mask: `(H, W)` or `(1, H, W)`, the video's valid region.
        window: frames per window (memory is that of a clip of ``window`` frames).
        overlap: frames shared by consecutive windows (0 <= overlap < window).

    Returns:
        ``{"class_queries_logits": (1, Q, K+1), "masks_queries_logits": (1, Q, T, H/4, W/4)}``.
    """
    if pixel_values_video.dim() == 5:
        pixel_values_video = pixel_values_video[0]
    if pixel_mask is not None and pixel_mask.dim() == 3:
        pixel_mask = pixel_mask[0]
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}.")
    num_frames = pixel_values_video.shape[0]
    step = window - overlap
    starts = list(range(0, max(num_frames - overlap, 1), step))
    tubes, probabilities, weights = None, None, 0
    for start in starts:
        end = min(start + window, num_frames)
        clip = pixel_values_video[start:end][None]
        outputs = model(pixel_values_videos=clip, pixel_mask=None if pixel_mask is None else pixel_mask[None])
        class_probabilities = outputs.class_queries_logits[0].float().softmax(-1)  # (Q, K+1)
        masks = outputs.masks_queries_logits[0].float()  # (Q, n, h, w)
        if tubes is None:
            tubes = masks
            probabilities, weights = class_probabilities * masks.shape[1], masks.shape[1]
            continue
        shared = min(overlap, tubes.shape[1], masks.shape[1])
        if shared:
            previous, current = tubes[:, -shared:].sigmoid(), masks[:, :shared].sigmoid()
        else:
            previous, current = tubes[:, -1:].sigmoid(), masks[:, :1].sigmoid()
        rows, cols = linear_sum_assignment((-soft_iou(previous, current)).cpu().numpy())
        order = torch.as_tensor(cols[rows.argsort()], device=masks.device)  # current query for each previous slot
        masks, class_probabilities = masks[order], class_probabilities[order]
        new_frames = masks[:, shared:]
        tubes = torch.cat([tubes, new_frames], dim=1)
        probabilities = probabilities + class_probabilities * new_frames.shape[1]
        weights += new_frames.shape[1]
    mean_probabilities = probabilities / weights
    return {
        "class_queries_logits": mean_probabilities.clamp_min(1e-12).log()[None],
        "masks_queries_logits": tubes[None],
    }


__all__ = ["soft_iou", "windowed_video_outputs"]
