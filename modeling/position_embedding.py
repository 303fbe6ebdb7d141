"""2-D sine position embedding (DETR style), normalised to [0, 2*pi] over the valid extent of each image.

Each of ``num_features`` channels of the y half and of the x half is ``sin`` or ``cos`` of the row (column) index
divided by ``temperature ** (2 * (i // 2) / num_features)``. With ``normalize=True`` the indices are rescaled so the
last *valid* row (column) sits at ``scale``: with a mask, padding does not stretch the embedding of the real pixels,
so an image gets the same embedding alone or padded in a batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Mask2FormerSinePositionEmbedding(nn.Module):
    """Sine position embedding of a `(B, C, H, W)` feature map.

    Args:
        num_features (`int`): channels per axis; the embedding has ``2 * num_features`` channels (y first, then x).
        temperature (`float`): base of the wavelengths.
        normalize (`bool`): rescale indices to ``[0, scale]`` over the valid extent.
        scale (`float`, *optional*): defaults to ``2 * pi``.
    """

    def __init__(
        self, num_features: int = 64, temperature: float = 10000.0, normalize: bool = False, scale: float | None = None
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError(f"scale={scale} only applies with normalize=True; pass normalize=True or drop scale.")
        self.num_features = num_features
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the embedding `(B, 2 * num_features, H, W)`; ``mask`` `(B, H, W)` is True on valid positions."""
        if mask is None:
            # 1-based indices; arange rather than cumsum(ones) keeps the dtype exact under torch.compile
            y_embed = (
                torch.arange(1, height + 1, device=device, dtype=dtype)
                .view(1, height, 1)
                .expand(batch_size, -1, width)
            )
            x_embed = (
                torch.arange(1, width + 1, device=device, dtype=dtype).view(1, 1, width).expand(batch_size, height, -1)
            )
        else:
            valid = mask.to(dtype)
            y_embed = valid.cumsum(1)  # (B, H, W): valid rows seen so far
            x_embed = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            # the last row (column) holds the number of valid rows (columns)
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        exponent = 2 * torch.div(torch.arange(self.num_features, device=device), 2, rounding_mode="floor")
        wavelengths = self.temperature ** (exponent.to(dtype) / self.num_features)  # (F,)
        # (B, H, W) -> (B, H, W, F), then interleave sin of even and cos of odd channels
        pos_x = x_embed[..., None] / wavelengths
        pos_y = y_embed[..., None] / wavelengths
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        # (B, H, W, 2F) -> (B, 2F, H, W)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
