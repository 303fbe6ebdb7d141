"""Tube predictor: one mask per frame for each query, and the space-time attention mask it gives the next layer.

The parameters are those of the image model's ``Mask2FormerMaskPredictor`` (the mask-embedding MLP), so an image
checkpoint initialises it. A query's mask embedding is dotted with every frame's mask features, giving its mask
*tube*; the tube resized per frame to the next layer's feature level and thresholded at sigmoid 0.5 is that layer's
masked-attention mask over all ``T * h * w`` keys of the clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import Mask2FormerMaskPredictor


class VideoMask2FormerMaskPredictor(Mask2FormerMaskPredictor):
    """Query features -> mask-tube logits at stride 4, and the masked-attention mask over the clip's keys.

    Args:
        hidden_size (`int`): width of the query features.
        mask_feature_size (`int`): channels of the mask features.
    """

    def forward(
        self,
        query_features: torch.Tensor,
        mask_features: torch.Tensor,
        attention_mask_size: tuple[int, int],
        key_valid_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query_features: `(B, Q, C)`, layer-normed decoder output.
            mask_features: `(B, T, D, H/4, W/4)` per-pixel embeddings of every frame.
            attention_mask_size: ``(h, w)`` of the feature level the next layer attends to.
            key_valid_mask: `(B, T*h*w)`, True on keys of real pixels; padded keys are never attended.

        Returns:
            mask-tube logits `(B, Q, T, H/4, W/4)` and the next layer's attention mask `(B, 1, Q, T*h*w)`, True where
            the query may attend. A query whose tube covers no valid key in any frame attends to all valid keys.
        """
        mask_embeddings = self.mask_embedder(query_features)  # (B, Q, D)
        # (B, Q, D) x (B, T, D, H, W) -> (B, Q, T, H, W)
        mask_logits = torch.einsum("bqc,btchw->bqthw", mask_embeddings, mask_features)

        batch_size, num_queries = mask_logits.shape[:2]
        # frames as channels: (B, Q, T, H, W) -> (B, Q*T, h, w) -> (B, Q, T*h*w); sigmoid(x) >= 0.5 <=> x >= 0
        resized = F.interpolate(
            mask_logits.flatten(1, 2), size=attention_mask_size, mode="bilinear", align_corners=False
        )
        attend = resized.view(batch_size, num_queries, -1).detach().sigmoid() >= 0.5
        if key_valid_mask is not None:
            attend = attend & key_valid_mask[:, None, :]
        # a row with nothing to attend to over the whole tube falls back to every (valid) key of the clip
        empty_row = ~attend.any(-1, keepdim=True)  # (B, Q, 1)
        fallback = torch.ones_like(attend) if key_valid_mask is None else key_valid_mask[:, None, :].expand_as(attend)
        attend = attend | (empty_row & fallback)
        return mask_logits, attend[:, None]  # (B, 1, Q, T*h*w)
