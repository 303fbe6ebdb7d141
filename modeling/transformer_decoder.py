"""Transformer decoder: learnable queries refined by masked cross-attention -> self-attention -> FFN.

    queries (Q learnable features + Q learnable position embeddings)
    prediction 0 from the queries alone -> attention mask for layer 0
    layer i (i = 0 .. decoder_layers - 2) attends to feature level i % 3 (strides 32, 16, 8, 32, ...):
        masked cross-attention (only inside the previous prediction's mask) -> self-attention -> FFN
        prediction i + 1 -> attention mask for layer i + 1

All attention goes through ``scaled_dot_product_attention``. Padded keys (the pixel decoder's per-level valid masks)
are excluded. The layers compute batch-first `(B, Q, C)`; the per-layer query states are returned in transformers'
`(Q, B, C)` layout, as views taken before their next use, so that they stay on the autograd path (``retain_grad()``
on them works).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_mask2former import Mask2FormerConfig
from .heads import Mask2FormerMaskPredictor
from .outputs import Mask2FormerMaskedAttentionDecoderOutput
from .position_embedding import Mask2FormerSinePositionEmbedding


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    # (B, N, C) -> (B, heads, N, C / heads)
    batch_size, length, channels = x.shape
    return x.view(batch_size, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (B, heads, N, D) -> (B, N, heads * D)
    return x.transpose(1, 2).flatten(2)


def _keep(state: torch.Tensor, kept: list[torch.Tensor] | None) -> torch.Tensor:
    """Appends a `(B, Q, C)` query state to ``kept`` in transformers' `(Q, B, C)` layout and returns the `(B, Q, C)`
    view *of the kept tensor* to compute on, so the returned state lies on the autograd path (as it does in
    transformers, which computes in that layout). Views only: nothing is copied."""
    if kept is None:
        return state
    kept.append(state.transpose(0, 1))  # (B, Q, C) -> (Q, B, C)
    return kept[-1].transpose(0, 1)


class Mask2FormerSelfAttention(nn.Module):
    """Multi-head self-attention among the queries; position embeddings are added to queries and keys only."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"hidden_dim={embed_dim} must be divisible by num_attention_heads={num_heads}.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, Q, C)` -> `(B, Q, C)`, and the weights `(B, heads, Q, Q)` when ``output_attentions``."""
        with_position = hidden_states + position_embeddings
        query = _split_heads(self.q_proj(with_position), self.num_heads)
        key = _split_heads(self.k_proj(with_position), self.num_heads)
        value = _split_heads(self.v_proj(hidden_states), self.num_heads)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:  # SDPA does not return the weights: spell the attention out
            weights = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)
            attended = F.dropout(weights, p=dropout, training=self.training) @ value
        else:
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        return self.out_proj(_merge_heads(attended)), weights


class Mask2FormerMaskedCrossAttention(nn.Module):
    """Multi-head cross-attention from the queries to one feature level, restricted by a boolean mask.

    Parameters are stored packed (``in_proj_weight`` = query, key, value projections stacked) as in
    ``nn.MultiheadAttention``, whose checkpoint names the released models use.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"hidden_dim={embed_dim} must be divisible by num_attention_heads={num_heads}.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            query: `(B, Q, C)` queries with their position embeddings.
            key: `(B, K, C)` features with their position embeddings.
            value: `(B, K, C)` features.
            attention_mask: `(B, 1, Q, K)` bool, True where a query may attend.

        Returns:
            `(B, Q, C)`.
        """
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        query = _split_heads(F.linear(query, weight_q, bias_q), self.num_heads)
        key = _split_heads(F.linear(key, weight_k, bias_k), self.num_heads)
        value = _split_heads(F.linear(value, weight_v, bias_v), self.num_heads)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, Q, D)
        return self.out_proj(_merge_heads(attended))


class Mask2FormerMaskedAttentionDecoderLayer(GradientCheckpointingLayer):
    """Masked cross-attention -> self-attention -> FFN, each with a residual and LayerNorm (post- or pre-norm)."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.pre_norm = config.pre_norm
        self.dropout = config.dropout
        self.self_attn = Mask2FormerSelfAttention(dim, config.num_attention_heads, config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = Mask2FormerMaskedCrossAttention(dim, config.num_attention_heads, config.dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.activation_fn = ACT2FN[config.activation_function]
        self.fc1 = nn.Linear(dim, config.dim_feedforward)
        self.fc2 = nn.Linear(config.dim_feedforward, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def initialize_parameters(self, config: Mask2FormerConfig) -> None:
        """Xavier-uniform matrices (gain ``init_xavier_std``), zero input-projection biases of the cross-attention."""
        for parameter in self.parameters():
            if parameter.dim() > 1:
                init.xavier_uniform_(parameter, gain=config.init_xavier_std)
        init.zeros_(self.cross_attn.in_proj_bias)

    def _residual(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return x + F.dropout(update, p=self.dropout, training=self.training)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(self.activation_fn(self.fc1(x)), p=self.dropout, training=self.training)
        return self.fc2(hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_position_embeddings: torch.Tensor,
        memory: torch.Tensor,
        memory_position_embeddings: torch.Tensor,
        attention_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: `(B, Q, C)` query features.
            query_position_embeddings: `(B, Q, C)`.
            memory: `(B, K, C)` one feature level, flattened.
            memory_position_embeddings: `(B, K, C)`.
            attention_mask: `(B, 1, Q, K)` bool, True where a query may attend.
            output_attentions: also return the self-attention weights.

        Returns:
            `(B, Q, C)` and the self-attention weights (or None).
        """
        keys = memory + memory_position_embeddings
        if self.pre_norm:
            normed = self.cross_attn_layer_norm(hidden_states)
            cross = self.cross_attn(normed + query_position_embeddings, keys, memory, attention_mask)
            hidden_states = self._residual(hidden_states, cross)
            attended, weights = self.self_attn(
                self.self_attn_layer_norm(hidden_states), query_position_embeddings, output_attentions
            )
            hidden_states = self._residual(hidden_states, attended)
            return self._residual(hidden_states, self._feed_forward(self.final_layer_norm(hidden_states))), weights

        cross = self.cross_attn(hidden_states + query_position_embeddings, keys, memory, attention_mask)
        hidden_states = self.cross_attn_layer_norm(self._residual(hidden_states, cross))
        attended, weights = self.self_attn(hidden_states, query_position_embeddings, output_attentions)
        hidden_states = self.self_attn_layer_norm(self._residual(hidden_states, attended))
        return self.final_layer_norm(self._residual(hidden_states, self._feed_forward(hidden_states))), weights


class Mask2FormerMaskedAttentionDecoder(nn.Module):
    """``decoder_layers - 1`` masked-attention layers, a shared LayerNorm and the mask predictor."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Mask2FormerMaskedAttentionDecoderLayer(config) for _ in range(config.decoder_layers - 1)
        )
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = Mask2FormerMaskPredictor(config.hidden_dim, config.mask_feature_size)
        self.num_feature_levels = config.num_feature_levels

    def forward(
        self,
        query_features: torch.Tensor,
        query_position_embeddings: torch.Tensor,
        memories: list[torch.Tensor],
        memory_position_embeddings: list[torch.Tensor],
        memory_sizes: list[tuple[int, int]],
        mask_features: torch.Tensor,
        key_valid_masks: list[torch.Tensor | None],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Mask2FormerMaskedAttentionDecoderOutput:
        """
        Args:
            query_features: `(B, Q, C)` initial query features.
            query_position_embeddings: `(B, Q, C)`.
            memories: per level `(B, h_l*w_l, C)`, strides 32, 16, 8.
            memory_position_embeddings: per level `(B, h_l*w_l, C)`.
            memory_sizes: ``(h_l, w_l)`` per level.
            mask_features: `(B, D, H/4, W/4)`.
            key_valid_masks: per level `(B, h_l*w_l)` bool (True = real pixel), or None without padding.
        """
        all_hidden_states = [] if output_hidden_states else None
        intermediate, mask_predictions = [], []
        attentions = () if output_attentions else None

        hidden_states = _keep(query_features, all_hidden_states)
        normed = _keep(self.layernorm(hidden_states), intermediate)
        mask_logits, attention_mask = self.mask_predictor(normed, mask_features, memory_sizes[0], key_valid_masks[0])
        mask_predictions.append(mask_logits)

        for index, layer in enumerate(self.layers):
            level = index % self.num_feature_levels
            hidden_states, weights = layer(
                hidden_states,
                query_position_embeddings,
                memories[level],
                memory_position_embeddings[level],
                attention_mask,
                output_attentions=output_attentions,
            )
            hidden_states = _keep(hidden_states, all_hidden_states)
            next_level = (index + 1) % self.num_feature_levels
            normed = _keep(self.layernorm(hidden_states), intermediate)
            mask_logits, attention_mask = self.mask_predictor(
                normed, mask_features, memory_sizes[next_level], key_valid_masks[next_level]
            )
            mask_predictions.append(mask_logits)
            if output_attentions:
                attentions += (weights,)

        return Mask2FormerMaskedAttentionDecoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=None if all_hidden_states is None else tuple(all_hidden_states),
            attentions=attentions,
            masks_queries_logits=tuple(mask_predictions),
            intermediate_hidden_states=tuple(intermediate),
        )


class Mask2FormerTransformerModule(nn.Module):
    """Prepares queries and the three feature levels, then runs the masked-attention decoder.

    Args:
        in_features (`int`): channels of the pixel decoder's multi-scale features.
        config (`Mask2FormerConfig`).
    """

    def __init__(self, in_features: int, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.num_feature_levels = config.num_feature_levels
        self.position_embedder = Mask2FormerSinePositionEmbedding(num_features=dim // 2, normalize=True)
        self.queries_embedder = nn.Embedding(config.num_queries, dim)  # query position embeddings
        self.queries_features = nn.Embedding(config.num_queries, dim)  # initial query features
        needs_projection = in_features != dim or config.enforce_input_projection
        self.input_projections = nn.ModuleList(
            nn.Conv2d(in_features, dim, kernel_size=1) if needs_projection else nn.Identity()
            for _ in range(self.num_feature_levels)
        )
        self.decoder = Mask2FormerMaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(self.num_feature_levels, dim)

    def initialize_parameters(self, config: Mask2FormerConfig) -> None:
        """Xavier-uniform input projections (gain ``init_xavier_std``) with zero biases."""
        for projection in self.input_projections:
            if isinstance(projection, nn.Conv2d):
                init.xavier_uniform_(projection.weight, gain=config.init_xavier_std)
                init.constant_(projection.bias, 0.0)

    def forward(
        self,
        multi_scale_features: tuple[torch.Tensor, ...],
        mask_features: torch.Tensor,
        level_valid_masks: tuple[torch.Tensor, ...] | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Mask2FormerMaskedAttentionDecoderOutput:
        """
        Args:
            multi_scale_features: `(B, C, h_l, w_l)` at strides 32, 16, 8.
            mask_features: `(B, D, H/4, W/4)`.
            level_valid_masks: `(B, h_l, w_l)` bool per level, True on real pixels (the pixel decoder's); None means
                no padding.
        """
        batch_size = mask_features.shape[0]
        memories, positions, sizes, key_valid_masks = [], [], [], []
        for level, features in enumerate(multi_scale_features):
            height, width = features.shape[-2:]
            mask = None if level_valid_masks is None else level_valid_masks[level]
            position = self.position_embedder(batch_size, height, width, features.device, features.dtype, mask)
            # (B, C, h, w) -> (B, h*w, C)
            projected = self.input_projections[level](features).flatten(2).transpose(1, 2)
            memories.append(projected + self.level_embed.weight[level])
            positions.append(position.flatten(2).transpose(1, 2))
            sizes.append((height, width))
            key_valid_masks.append(None if mask is None else mask.flatten(1))

        # (Q, C) -> (B, Q, C)
        query_position_embeddings = self.queries_embedder.weight[None].expand(batch_size, -1, -1)
        query_features = self.queries_features.weight[None].expand(batch_size, -1, -1)
        return self.decoder(
            query_features,
            query_position_embeddings,
            memories,
            positions,
            sizes,
            mask_features,
            key_valid_masks,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
