"""Prediction heads: the mask-embedding MLP, the mask predictor and the attention mask it gives the next layer.

The class head is a single ``nn.Linear`` (``class_predictor`` of the segmentation model); the mask head maps each
query to an embedding whose dot product with the per-pixel mask features is the query's mask logit. The same mask,
resized to the next layer's feature level and thresholded at sigmoid 0.5, is that layer's masked-attention mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

if TYPE_CHECKING:
    from .configuration_mask2former import Mask2FormerConfig


class Mask2FormerPredictionBlock(nn.Sequential):
    """``Linear -> activation``; a Sequential so that its linear layer is named ``0`` as in the checkpoints."""

    def __init__(self, in_dim: int, out_dim: int, activation: nn.Module) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), activation)

    def initialize_parameters(self, config: Mask2FormerConfig) -> None:
        """torch's default `nn.Linear` initialisation, as in the original mask MLP."""
        linear = self[0]
        init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(linear.weight.shape[1])
        init.uniform_(linear.bias, -bound, bound)


class Mask2FormerMLPPredictionHead(nn.Sequential):
    """An MLP of ``num_layers`` blocks with ReLU between them (none after the last).

    Args:
        input_dim (`int`), hidden_dim (`int`), output_dim (`int`): widths.
        num_layers (`int`, defaults to 3): linear layers.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3) -> None:
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        super().__init__(
            *(
                Mask2FormerPredictionBlock(i, o, nn.ReLU() if n < num_layers - 1 else nn.Identity())
                for n, (i, o) in enumerate(zip(in_dims, out_dims))
            )
        )


class Mask2FormerMaskPredictor(nn.Module):
    """Query features -> mask logits at stride 4, and the masked-attention mask for the next decoder layer.

    Args:
        hidden_size (`int`): width of the query features.
        mask_feature_size (`int`): channels of the mask features.
    """

    def __init__(self, hidden_size: int, mask_feature_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.mask_embedder = Mask2FormerMLPPredictionHead(hidden_size, hidden_size, mask_feature_size)

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
            mask_features: `(B, D, H/4, W/4)` per-pixel embeddings.
            attention_mask_size: ``(h, w)`` of the feature level the next layer attends to.
            key_valid_mask: `(B, h*w)`, True on keys of real pixels; padded keys are never attended.

        Returns:
            mask logits `(B, Q, H/4, W/4)` and the next layer's attention mask `(B, 1, Q, h*w)`, True where the query
            may attend (the same for every head). A query whose predicted mask covers no valid key attends to all
            valid keys, so no softmax row is empty.
        """
        mask_embeddings = self.mask_embedder(query_features)  # (B, Q, D)
        # (B, Q, D) x (B, D, H, W) -> (B, Q, H, W)
        mask_logits = torch.einsum("bqc,bchw->bqhw", mask_embeddings, mask_features)

        # (B, Q, H, W) -> (B, Q, h, w) -> (B, Q, h*w); sigmoid(x) >= 0.5 <=> x >= 0
        resized = F.interpolate(mask_logits, size=attention_mask_size, mode="bilinear", align_corners=False)
        attend = resized.flatten(2).detach().sigmoid() >= 0.5
        if key_valid_mask is not None:
            attend = attend & key_valid_mask[:, None, :]
        # a row with nothing to attend to falls back to every (valid) key
        empty_row = ~attend.any(-1, keepdim=True)  # (B, Q, 1)
        fallback = torch.ones_like(attend) if key_valid_mask is None else key_valid_mask[:, None, :].expand_as(attend)
        attend = attend | (empty_row & fallback)  # not torch.where: ONNX Runtime has no Where on booleans
        return mask_logits, attend[:, None]  # (B, 1, Q, h*w)
