"""Point sampling for the Mask2Former training objective.

Mask2Former never computes its mask losses on whole masks: both the Hungarian matcher and the losses read mask logits
and targets at a few thousand points per mask (``config.train_num_points``, 12544 = 112 x 112 by default). The matcher
uses the same uniformly random points for every prediction and target of an image; the losses pick most points where
the prediction is uncertain (logit near 0), as PointRend does. This saves about 3x training memory (Section 3.3 of
the paper).

Coordinates are normalised to ``[0, 1] x [0, 1]`` (x, y) over the whole tensor, so predictions at 1/4 resolution and
targets at full resolution are read at the same physical positions without resizing either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(features: torch.Tensor, point_coordinates: torch.Tensor) -> torch.Tensor:
    """
    Bilinearly read feature maps at normalised point coordinates.

    Args:
        features (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            Feature maps (mask logits or binary targets, one mask per channel or per batch row).
        point_coordinates (`torch.Tensor` of shape `(batch_size, num_points, 2)`):
            `(x, y)` coordinates in `[0, 1] x [0, 1]`; `(0, 0)` is the top-left corner of the top-left pixel.

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, num_points)`: the interpolated values (zero outside).
    """
    # grid_sample wants coordinates in [-1, 1] and a 2-D grid: (B, P, 2) -> (B, P, 1, 2)
    grid = (2.0 * point_coordinates - 1.0).unsqueeze(2)
    # (B, C, H, W) -> (B, C, P, 1) -> (B, C, P)
    return F.grid_sample(features, grid.to(features.dtype), mode="bilinear", align_corners=False).squeeze(3)


def sample_uniform_points(
    batch_size: int, num_points: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    Uniformly random point coordinates.

    Args:
        batch_size (`int`): number of independent point sets.
        num_points (`int`): points per set.
        device (`torch.device`): where to create them.
        generator (`torch.Generator`, *optional*): random generator (the global one when `None`).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_points, 2)`, float32 coordinates in `[0, 1)`.
    """
    return torch.rand(batch_size, num_points, 2, device=device, generator=generator)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a binary mask logit: `-|logit|`, highest where the prediction is closest to 0.5."""
    return -logits.abs()


def sample_points_by_uncertainty(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Choose point coordinates per mask, mostly where the predicted logit is uncertain (PointRend's training sampler).

    `oversample_ratio * num_points` points are drawn uniformly, the `importance_sample_ratio * num_points` of them with
    the highest uncertainty (`-|logit|`) are kept, and the rest of the `num_points` are drawn uniformly again.
    The random draws happen in this order (candidates, then the uniform remainder), which is also transformers' order,
    so with the same seed both pick the same points.

    Args:
        mask_logits (`torch.Tensor` of shape `(num_masks, height, width)`):
            Predicted mask logits. Only their values are used (no gradient flows through the choice).
        num_points (`int`): points per mask.
        oversample_ratio (`float`): candidates drawn per kept point (>= 1).
        importance_sample_ratio (`float`): fraction of the points chosen by uncertainty, in `[0, 1]`.
        generator (`torch.Generator`, *optional*): random generator (the global one when `None`).

    Returns:
        `torch.Tensor` of shape `(num_masks, num_points, 2)`: coordinates in `[0, 1] x [0, 1]`.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}.")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}.")
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points

    with torch.no_grad():
        # (M, num_candidates, 2)
        candidates = sample_uniform_points(num_masks, num_candidates, mask_logits.device, generator)
        # (M, H, W) -> (M, 1, H, W) -> (M, 1, num_candidates) -> (M, num_candidates)
        candidate_logits = point_sample(mask_logits.unsqueeze(1), candidates).squeeze(1)
        top_indices = uncertainty(candidate_logits).topk(num_uncertain_points, dim=1).indices
        # (M, num_candidates, 2) -> (M, num_uncertain_points, 2)
        uncertain_points = torch.gather(candidates, 1, top_indices.unsqueeze(-1).expand(-1, -1, 2))
        if num_random_points == 0:
            return uncertain_points
        random_points = sample_uniform_points(num_masks, num_random_points, mask_logits.device, generator)
        # -> (M, num_points, 2)
        return torch.cat([uncertain_points, random_points], dim=1)
