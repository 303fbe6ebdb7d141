"""Segmenter's decoders: the mask transformer (the paper's) and the linear baseline.

Mask transformer (Strudel et al., Sec. 3.2): the patch tokens are projected, ``K`` learned class embeddings are
appended *after* them as extra tokens, and pre-norm ViT blocks process patches and classes jointly. After a final
LayerNorm both are projected (right-multiplied ``(d, d)`` parameters), L2-normalised, and the masks are their scalar
products, normalised over the classes by ``mask_norm``:

    patch tokens (B, N, D_enc) -> proj_dec -> [patches ; cls_emb] (B, N + K, d) -> blocks -> decoder_norm
      -> patches @ proj_patch, classes @ proj_classes -> x / |x| -> patches . classes^T (B, N, K) -> mask_norm
      -> (B, K, h, w)

Parameter names are the original's (``cls_emb``, ``proj_dec``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``decoder_norm``, ``proj_patch``, ``proj_classes``, ``mask_norm``; ``head`` for the linear
decoder), so the converter only adds a prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_segmenter import SegmenterConfig


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for whole samples with probability `drop_prob`, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    # one Bernoulli draw per sample, broadcast over tokens and channels: (B, 1, 1)
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


class SegmenterDropPath(nn.Module):
    """Dropout followed by stochastic depth, for the output of a residual branch (no parameters)."""

    def __init__(self, dropout: float, drop_prob: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.drop_prob = float(drop_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(self.dropout(hidden_states), self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SegmenterAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection (``qkv``) and an output ``proj``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attention_dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, T, d) -> (B, T, d)`."""
        batch_size, num_tokens, width = hidden_states.shape
        # (B, T, 3d) -> (3, B, heads, T, d / heads)
        qkv = self.qkv(hidden_states).view(batch_size, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d / heads)) v, per head
        attended = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.attention_dropout if self.training else 0.0
        )
        # (B, heads, T, d / heads) -> (B, T, d)
        attended = attended.transpose(1, 2).reshape(batch_size, num_tokens, width)
        return self.proj_dropout(self.proj(attended))


class SegmenterFeedForward(nn.Module):
    """``fc1 -> GELU (exact) -> dropout -> fc2 -> dropout``."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(hidden_states)))))


class SegmenterBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each branch drop-pathed."""

    def __init__(self, config: SegmenterConfig, drop_prob: float) -> None:
        super().__init__()
        width, eps = config.decoder_hidden_size, config.decoder_layer_norm_eps
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = SegmenterAttention(width, config.decoder_num_attention_heads, config.decoder_dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = SegmenterFeedForward(width, config.decoder_intermediate_size, config.decoder_dropout)
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + drop_path(self.attn(self.norm1(hidden_states)), self.drop_prob, self.training)
        return hidden_states + drop_path(self.mlp(self.norm2(hidden_states)), self.drop_prob, self.training)


def drop_path_rates(rate: float, num_layers: int) -> list[float]:
    """Stochastic-depth probability per layer, linear from 0 to `rate` (the original's rule)."""
    if num_layers < 2:
        return [0.0] * num_layers
    return [rate * index / (num_layers - 1) for index in range(num_layers)]


class SegmenterMaskTransformer(nn.Module):
    """The mask-transformer decoder: patch tokens `(B, N, D_enc)` -> class masks `(B, K, h, w)`."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        width, num_classes = config.decoder_hidden_size, config.num_labels
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(config.encoder_config.hidden_size, width)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, width))
        rates = drop_path_rates(config.decoder_drop_path_rate, config.decoder_layers)
        self.blocks = nn.ModuleList(SegmenterBlock(config, rate) for rate in rates)
        self.decoder_norm = nn.LayerNorm(width, eps=config.decoder_layer_norm_eps)
        self.proj_patch = nn.Parameter(torch.zeros(width, width))
        self.proj_classes = nn.Parameter(torch.zeros(width, width))
        self.mask_norm = nn.LayerNorm(num_classes, eps=config.decoder_layer_norm_eps)

    def forward(self, patch_tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """
        Args:
            patch_tokens (`torch.Tensor` of shape `(B, h*w, D_enc)`): the encoder's patch tokens, row-major.
            grid_size (`tuple[int, int]`): `(h, w)`.

        Returns:
            `torch.Tensor` of shape `(B, K, h, w)`: per-class mask logits at patch resolution.
        """
        batch_size = patch_tokens.shape[0]
        hidden_states = self.proj_dec(patch_tokens)  # (B, N, D_enc) -> (B, N, d)
        classes = self.cls_emb.expand(batch_size, -1, -1)
        hidden_states = torch.cat([hidden_states, classes], dim=1)  # (B, N + K, d)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.decoder_norm(hidden_states)
        patches = hidden_states[:, : -self.num_classes] @ self.proj_patch  # (B, N, d)
        classes = hidden_states[:, -self.num_classes :] @ self.proj_classes  # (B, K, d)
        # L2 normalisation without eps, as the original
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, d) x (B, d, K) -> (B, N, K)
        # (B, h*w, K) -> (B, K, h, w)
        return masks.transpose(1, 2).reshape(batch_size, self.num_classes, *grid_size)


class SegmenterLinearDecoder(nn.Module):
    """The linear decoder: one `Linear(D_enc, K)` per patch token -> `(B, K, h, w)`."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.head = nn.Linear(config.encoder_config.hidden_size, config.num_labels)

    def forward(self, patch_tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        logits = self.head(patch_tokens)  # (B, h*w, D_enc) -> (B, h*w, K)
        # (B, h*w, K) -> (B, K, h, w)
        return logits.transpose(1, 2).reshape(logits.shape[0], -1, *grid_size)


def build_decoder(config: SegmenterConfig) -> nn.Module:
    """The decoder ``config.decoder_type`` names."""
    if config.decoder_type == "linear":
        return SegmenterLinearDecoder(config)
    return SegmenterMaskTransformer(config)


__all__ = ["SegmenterLinearDecoder", "SegmenterMaskTransformer", "build_decoder"]
