"""3-D sine position embedding of a clip: the image model's 2-D embedding of (y, x) plus a sine of the frame index.

For ``num_features`` = F (half the decoder width), the embedding of frame ``t`` at ``(y, x)`` is

    cat(sine(y) on F channels, sine(x) on F channels) + sine(t) on 2F channels

where each sine interleaves ``sin`` (even channels) and ``cos`` (odd channels) of the normalised index divided by
``temperature ** (2 * (i // 2) / channels)``, and indices are 1-based and rescaled so the last valid one sits at
``2 * pi`` (the frame index by the clip length, so the temporal term depends on T). This is the video Mask2Former's
``PositionEmbeddingSine3D``; the spatial half is exactly ``Mask2FormerSinePositionEmbedding``, so with the temporal
term switched off a one-frame clip gets the image model's embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .position_embedding import Mask2FormerSinePositionEmbedding


class VideoMask2FormerSinePositionEmbedding(nn.Module):
    """Sine position embedding of a `(B, T, C, H, W)` clip of feature maps.

    Args:
        num_features (`int`): channels per spatial axis; the embedding has ``2 * num_features`` channels.
        temperature (`float`): base of the wavelengths.
        temporal (`bool`, defaults to `True`): add the frame-index term; without it every frame gets the image
            model's 2-D embedding.
    """

    def __init__(self, num_features: int = 128, temperature: float = 10000.0, temporal: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature
        self.temporal = temporal
        self.scale = 2 * math.pi
        self.spatial = Mask2FormerSinePositionEmbedding(num_features, temperature, normalize=True)

    def temporal_embedding(self, num_frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`(T, 2 * num_features)`: the frame-index term, the same for every position of a frame."""
        channels = 2 * self.num_features
        # 1-based frame index normalised so the last frame sits at 2 pi: (T,)
        frame_index = torch.arange(1, num_frames + 1, device=device, dtype=dtype)
        frame_index = frame_index / (frame_index[-1:] + 1e-6) * self.scale
        exponent = 2 * torch.div(torch.arange(channels, device=device), 2, rounding_mode="floor")
        wavelengths = self.temperature ** (exponent.to(dtype) / channels)  # (2F,)
        # (T, 1) / (2F,) -> (T, 2F), then interleave sin of even and cos of odd channels
        angles = frame_index[:, None] / wavelengths
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    def forward(
        self,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the embedding `(B, T, 2 * num_features, H, W)`.

        ``mask`` `(B, H, W)` is True on valid positions (one mask per video: every frame of a clip is padded alike).
        """
        spatial = self.spatial(batch_size, height, width, device, dtype, mask)  # (B, 2F, H, W)
        # (B, 2F, H, W) -> (B, T, 2F, H, W)
        embedding = spatial[:, None].expand(-1, num_frames, -1, -1, -1)
        if not self.temporal:
            return embedding
        # (T, 2F) -> (1, T, 2F, 1, 1)
        return embedding + self.temporal_embedding(num_frames, device, dtype)[None, :, :, None, None]
