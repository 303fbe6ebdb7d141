"""Dispatch for multi-scale deformable attention.

Placeholder until the compiled kernels land (issue 3): always runs the pure-PyTorch reference.
"""

from __future__ import annotations

import torch

from .ms_deform_attn_reference import multi_scale_deformable_attention_reference


def multi_scale_deformable_attention(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor | list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`(B, S, h, D)` values sampled at `(B, Q, h, L, P, 2)` locations -> `(B, Q, h*D)`; see the reference."""
    return multi_scale_deformable_attention_reference(
        value, value_spatial_shapes, sampling_locations, attention_weights
    )
