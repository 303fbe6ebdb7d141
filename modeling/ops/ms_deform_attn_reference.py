"""Pure-PyTorch multi-scale deformable attention: the specification, the test oracle and the fallback.

Semantics are those of transformers' ``multi_scale_deformable_attention``: bilinear sampling with
``align_corners=False``, zero outside each feature map, a weighted sum over levels and points per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_scale_deformable_attention_reference(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor | list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Samples every level of ``value`` at ``sampling_locations`` and sums the samples with ``attention_weights``.

    Args:
        value: `(B, S, h, D)` with ``S = sum(H_l * W_l)``, the levels flattened row-major one after another.
        value_spatial_shapes: `(L, 2)` tensor or list of ``(H_l, W_l)``.
        sampling_locations: `(B, Q, h, L, P, 2)`, ``(x, y)`` normalised to ``[0, 1]`` over each level.
        attention_weights: `(B, Q, h, L, P)`.

    Returns:
        `(B, Q, h * D)`.
    """
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # A tensor is read on the host; python ints (or SymInts under torch.export) are kept as given so that dynamic
    # sizes are not specialised.
    if isinstance(value_spatial_shapes, torch.Tensor):
        shapes = [(int(height), int(width)) for height, width in value_spatial_shapes.tolist()]
    else:
        shapes = [(height, width) for height, width in value_spatial_shapes]
    value_per_level = value.split([height * width for height, width in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, (height, width) in enumerate(shapes):
        # (B, H*W, h, D) -> (B, h, D, H*W) -> (B*h, D, H, W)
        level_value = (
            value_per_level[level].permute(0, 2, 3, 1).reshape(batch_size * num_heads, head_dim, height, width)
        )
        # (B, Q, h, P, 2) -> (B, h, Q, P, 2) -> (B*h, Q, P, 2)
        level_grid = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*h, D, Q, P)
        sampled_per_level.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B, Q, h, L, P) -> (B, h, Q, L, P) -> (B*h, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(
        batch_size * num_heads, 1, num_queries, num_levels * num_points
    )
    # (B*h, D, Q, L, P) -> (B*h, D, Q, L*P) -> (B*h, D, Q) -> (B, h*D, Q)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(batch_size, num_heads * head_dim, num_queries)
    # (B, h*D, Q) -> (B, Q, h*D)
    return output.transpose(1, 2).contiguous()
