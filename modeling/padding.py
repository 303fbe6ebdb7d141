"""Padding helpers: valid regions from ``pixel_mask`` and the per-size grouping of the pixel-level module.

Why the pixel-level module runs per valid region: masking values, valid ratios and masked attention keep padding out
of the *attention* layers, but the backbone's convolutions, normalisation statistics and Swin windows, the pixel
decoder's GroupNorm statistics, its 3x3 convolutions and its bilinear upsampling all read across the border of the
valid region. The only exact cure is to not show the padding: each image runs on its valid region rounded up to the
size divisor (32), i.e. exactly the input the image processor gives that image alone, and the resulting maps are
zero-padded back to the batch size. Images of the same rounded size share one call, so the common training batch
(all images one size) is a single call without any cropping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE_DIVISOR = 32


def valid_sizes(pixel_mask: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` mask (padding at the bottom/right) -> `(B, 2)` long ``(valid_height, valid_width)``."""
    mask = pixel_mask.bool()
    return torch.stack([mask.any(2).sum(1), mask.any(1).sum(1)], -1)


def downsample_valid_mask(pixel_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The valid region of a `(B, H, W)` pixel mask on a `(height, width)` feature grid -> `(B, height, width)` bool.

    A feature cell is valid when its receptive cell holds at least one real pixel: with stride ``s = H / height`` the
    first ``ceil(valid_height / s)`` rows are valid (and likewise for columns). Computed from the valid extent only,
    so the rule gives the same cells for an image alone and padded in a batch.
    """
    full_height, full_width = pixel_mask.shape[-2:]
    sizes = valid_sizes(pixel_mask)
    # ceil(valid * height / full) in integers
    valid_rows = (sizes[:, 0] * height + full_height - 1) // full_height
    valid_cols = (sizes[:, 1] * width + full_width - 1) // full_width
    rows = torch.arange(height, device=pixel_mask.device)
    cols = torch.arange(width, device=pixel_mask.device)
    # (B, height, 1) & (B, 1, width) -> (B, height, width)
    return (rows[None, :, None] < valid_rows[:, None, None]) & (cols[None, None, :] < valid_cols[:, None, None])


@dataclass
class SizeGroup:
    """Images of a batch that share one rounded-up valid size."""

    indices: list[int]
    height: int
    width: int
    has_padding: bool  # whether any of them has padding inside (height, width)


def group_by_padded_size(pixel_mask: torch.Tensor, size_divisor: int = SIZE_DIVISOR) -> list[SizeGroup]:
    """Groups the images of a batch by their valid size rounded up to ``size_divisor`` (reads the mask on the host)."""
    groups: dict[tuple[int, int], SizeGroup] = {}
    for index, (valid_height, valid_width) in enumerate(valid_sizes(pixel_mask).tolist()):
        if valid_height == 0 or valid_width == 0:
            raise ValueError(f"pixel_mask[{index}] has no valid pixel; every image needs at least one.")
        height = -(-valid_height // size_divisor) * size_divisor
        width = -(-valid_width // size_divisor) * size_divisor
        group = groups.setdefault((height, width), SizeGroup([], height, width, False))
        group.indices.append(index)
        group.has_padding |= valid_height != height or valid_width != width
    return list(groups.values())


def scatter_padded(
    per_group: list[list[torch.Tensor]], groups: list[SizeGroup], batch_size: int, height: int, width: int
) -> list[torch.Tensor]:
    """Assembles maps computed per group into zero-padded batch maps.

    Args:
        per_group: for each group, the same list of maps `(B_g, C, h_g / s, w_g / s)` (one stride ``s`` per entry).
        groups: the groups, with the batch indices of their images.
        batch_size, height, width: the batch's input size.

    Returns:
        one `(B, C, H / s, W / s)` map per entry, zero where an image's crop does not reach.
    """
    assembled = []
    for entry, first in enumerate(per_group[0]):
        stride = groups[0].height // first.shape[-2]
        full = first.new_zeros(batch_size, first.shape[1], height // stride, width // stride)
        for group, maps in zip(groups, per_group):
            index = torch.tensor(group.indices, device=full.device)
            crop = maps[entry]
            # (B, C, H/s, W/s)[indices, :, :h, :w] = (B_g, C, h, w)
            full[index, :, : crop.shape[-2], : crop.shape[-1]] = crop
        assembled.append(full)
    return assembled
