"""Pixel decoder: a multi-scale deformable-attention encoder over strides 32/16/8, then an FPN down to stride 4.

    backbone maps (strides 4, 8, 16, 32)
      strides 32, 16, 8 -> 1x1 conv + GroupNorm -> flatten + concat -> 6 deformable encoder layers -> split
      stride 4          -> 1x1 lateral conv + bilinear 2x of the stride-8 output -> 3x3 conv   (the FPN step)
      stride-4 output   -> 1x1 mask projection = mask features
    outputs: multi-scale features (strides 32, 16, 8) for the transformer decoder, mask features (stride 4)

Padding: the valid regions (``padding.ValidRegions``, from ``pixel_mask``) mark the padded cells of every level; they
are never sampled as values (their values are zeroed), the reference points and sampling offsets are scaled to each
image's valid extent (valid ratios), and the position embedding is normalised by the valid extent. The per-level valid
masks are returned with the features, for the transformer decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_mask2former import Mask2FormerConfig
from .ops import multi_scale_deformable_attention
from .outputs import Mask2FormerPixelDecoderOutput
from .padding import ValidRegions
from .position_embedding import Mask2FormerSinePositionEmbedding


class Mask2FormerMultiscaleDeformableAttention(nn.Module):
    """Deformable attention (Deformable DETR): each query samples ``n_points`` values per level and head around its
    reference point, at learned offsets, and averages them with learned weights.

    Args:
        embed_dim (`int`): channels of queries and values.
        num_heads (`int`): attention heads.
        n_levels (`int`): feature levels.
        n_points (`int`): sampling points per level and head.
    """

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int, n_points: int) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        self.embed_dim = embed_dim
        self.n_heads = num_heads
        self.n_levels = n_levels
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * n_levels * n_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

    def initialize_parameters(self, config: Mask2FormerConfig) -> None:
        """Deformable DETR's rule: sampling offsets start on rings around the reference point (one direction per
        head, point ``p`` at distance ``p + 1``), uniform attention weights, xavier projections."""
        init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (heads, 2) -> (heads, L, P, 2)
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        init.copy_(self.sampling_offsets.bias, grid.flatten())
        init.constant_(self.attention_weights.weight, 0.0)
        init.constant_(self.attention_weights.bias, 0.0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0.0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: `(B, S, C)`, all levels flattened; they are both the queries and the values.
            position_embeddings: `(B, S, C)`, added to the queries only.
            reference_points: `(B, S, L, 2)`, ``(x, y)`` in ``[0, 1]`` of each level's padded extent.
            spatial_shapes: ``(H_l, W_l)`` per level.
            valid_mask: `(B, S)`, True on real pixels; padded values are zeroed.

        Returns:
            output `(B, S, C)` and attention weights `(B, S, heads, L, P)`.
        """
        batch_size, num_queries, _ = hidden_states.shape
        head_dim = self.embed_dim // self.n_heads
        queries = hidden_states + position_embeddings

        value = self.value_proj(hidden_states)
        if valid_mask is not None:
            value = value.masked_fill(~valid_mask[..., None], 0.0)
        # (B, S, C) -> (B, S, heads, D)
        value = value.view(batch_size, -1, self.n_heads, head_dim)

        # (B, S, heads*L*P*2) -> (B, S, heads, L, P, 2)
        offsets = self.sampling_offsets(queries).view(
            batch_size, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        # softmax over all levels and points of a head: (B, S, heads, L*P) -> (B, S, heads, L, P)
        weights = self.attention_weights(queries).view(batch_size, num_queries, self.n_heads, -1)
        weights = weights.softmax(-1).view(batch_size, num_queries, self.n_heads, self.n_levels, self.n_points)

        # offsets are in pixels of each level: divide by (W_l, H_l), by Python scalars rather than a tensor built from
        # the sizes, so that torch.export keeps them symbolic. Per level (B, S, heads, P, 2) -> (B, S, heads, L, P, 2)
        offsets = torch.stack(
            [
                torch.stack([offsets[:, :, :, level, :, 0] / width, offsets[:, :, :, level, :, 1] / height], -1)
                for level, (height, width) in enumerate(spatial_shapes)
            ],
            3,
        )
        # (B, S, 1, L, 1, 2) + (B, S, heads, L, P, 2). Locations in [0, 1] lose whole pixels in fp16/bf16 (8 bits of
        # mantissa over a 128-wide map), so under mixed precision they stay fp32 and the op then runs in fp32.
        sampling_locations = reference_points[:, :, None, :, None, :].float() + offsets.float()

        output = multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, weights)  # (B, S, C)
        return self.output_proj(output), weights


class Mask2FormerPixelDecoderEncoderLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.feature_size
        self.self_attn = Mask2FormerMultiscaleDeformableAttention(
            dim, config.num_attention_heads, n_levels=config.num_feature_levels, n_points=config.encoder_n_points
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_feedforward_dim)
        self.fc2 = nn.Linear(config.encoder_feedforward_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = config.dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(B, S, C)` -> `(B, S, C)`."""
        attended, _ = self.self_attn(hidden_states, position_embeddings, reference_points, spatial_shapes, valid_mask)
        hidden_states = self.self_attn_layer_norm(
            hidden_states + F.dropout(attended, p=self.dropout, training=self.training)
        )
        residual = hidden_states
        hidden_states = F.dropout(F.relu(self.fc1(hidden_states)), p=self.dropout, training=self.training)
        hidden_states = F.dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        return self.final_layer_norm(residual + hidden_states)


class Mask2FormerPixelDecoderEncoder(nn.Module):
    """``config.encoder_layers`` deformable encoder layers over the flattened strides-32/16/8 features."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Mask2FormerPixelDecoderEncoderLayer(config) for _ in range(config.encoder_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level as seen from every level: `(B, L, 2)` valid ratios -> `(B, S, L, 2)`.

        A centre is first normalised by its own level's valid extent, then rescaled to each level's padded extent,
        so all levels agree on where a point of the image is even when padding differs per level.
        """
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes):
            # cell centres 0.5, 1.5, ... (arange, unlike linspace, keeps sizes symbolic under torch.export)
            rows = torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            cols = torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
            # (H*W,) -> (B, H*W) in [0, 1] of the valid extent
            ref_y = grid_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = grid_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        # (B, S, 2) -> (B, S, L, 2)
        return torch.cat(per_level, 1)[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        valid_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(B, S, C)` -> `(B, S, C)`."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, reference_points, spatial_shapes, valid_mask)
        return hidden_states


class Mask2FormerPixelDecoder(nn.Module):
    """Backbone maps -> multi-scale features (strides 32, 16, 8), their valid masks, and mask features (stride 4).

    Args:
        config (`Mask2FormerConfig`): uses ``feature_size``, ``mask_feature_size``, ``feature_strides``,
            ``common_stride``, ``num_feature_levels`` and the encoder fields.
        feature_channels (`list[int]`): channels of the backbone's maps, strides 4 to 32.
    """

    def __init__(self, config: Mask2FormerConfig, feature_channels: list[int]) -> None:
        super().__init__()
        dim = config.feature_size
        self.num_feature_levels = config.num_feature_levels
        self.position_embedding = Mask2FormerSinePositionEmbedding(num_features=dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(self.num_feature_levels, dim))
        # one projection per encoder level, lowest resolution first (stride 32, 16, 8)
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, dim, kernel_size=1), nn.GroupNorm(32, dim))
            for channels in feature_channels[-self.num_feature_levels :][::-1]
        )
        self.encoder = Mask2FormerPixelDecoderEncoder(config)
        self.mask_projection = nn.Conv2d(dim, config.mask_feature_size, kernel_size=1)

        # FPN levels below the encoder's finest stride, down to common_stride (one level: stride 4)
        finest_encoder_stride = min(config.feature_strides[-self.num_feature_levels :])
        self.num_fpn_levels = int(math.log2(finest_encoder_stride) - math.log2(config.common_stride))
        lateral_convolutions, output_convolutions = [], []
        for index, channels in enumerate(feature_channels[: self.num_fpn_levels]):
            lateral = nn.Sequential(nn.Conv2d(channels, dim, kernel_size=1, bias=False), nn.GroupNorm(32, dim))
            output = nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU()
            )
            # checkpoint names: adapter_1/layer_1 is the highest-resolution FPN level
            self.add_module(f"adapter_{index + 1}", lateral)
            self.add_module(f"layer_{index + 1}", output)
            lateral_convolutions.append(lateral)
            output_convolutions.append(output)
        # run from low to high resolution
        self.lateral_convolutions = lateral_convolutions[::-1]
        self.output_convolutions = output_convolutions[::-1]

    def initialize_parameters(self, config: Mask2FormerConfig) -> None:
        """The level embeddings are standard normal."""
        init.normal_(self.level_embed, std=1.0)

    def forward(
        self, features: list[torch.Tensor], valid_regions: ValidRegions | None = None
    ) -> Mask2FormerPixelDecoderOutput:
        """
        Args:
            features: backbone maps `(B, C_i, H/s_i, W/s_i)`, strides 4, 8, 16, 32.
            valid_regions: where each image's real pixels are (see ``padding.py``); None means no padding.
        """
        encoder_inputs = features[::-1][: self.num_feature_levels]  # strides 32, 16, 8
        batch_size = encoder_inputs[0].shape[0]
        spatial_shapes = [(x.shape[2], x.shape[3]) for x in encoder_inputs]

        flat_inputs, flat_positions, level_masks = [], [], []
        for level, x in enumerate(encoder_inputs):
            height, width = x.shape[2], x.shape[3]
            mask = None if valid_regions is None else valid_regions.on_grid(height, width)  # (B, H_l, W_l)
            position = self.position_embedding(batch_size, height, width, x.device, x.dtype, mask)
            # (B, C, H_l, W_l) -> (B, H_l*W_l, C)
            flat_inputs.append(self.input_projections[level](x).flatten(2).transpose(1, 2))
            flat_positions.append(position.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
            level_masks.append(mask)
        hidden_states = torch.cat(flat_inputs, 1)  # (B, S, C)
        position_embeddings = torch.cat(flat_positions, 1)

        if valid_regions is None:
            valid_mask = None
            valid_ratios = hidden_states.new_ones(batch_size, self.num_feature_levels, 2)
        else:
            valid_mask = torch.cat([mask.flatten(1) for mask in level_masks], 1)  # (B, S)
            # (B, L, 2) as (width ratio, height ratio): valid columns of row 0, valid rows of column 0
            valid_ratios = torch.stack(
                [
                    torch.stack([mask[:, 0, :].sum(1) / mask.shape[2], mask[:, :, 0].sum(1) / mask.shape[1]], -1)
                    for mask in level_masks
                ],
                1,
            ).to(hidden_states.dtype)

        hidden_states = self.encoder(hidden_states, position_embeddings, spatial_shapes, valid_ratios, valid_mask)

        # (B, S, C) -> per level (B, C, H_l, W_l)
        outputs = [
            level.transpose(1, 2).reshape(batch_size, -1, height, width)
            for level, (height, width) in zip(
                hidden_states.split([h * w for h, w in spatial_shapes], 1), spatial_shapes
            )
        ]

        # FPN: add the upsampled coarser output to a lateral projection of the finer backbone map
        for lateral_conv, output_conv, feature in zip(
            self.lateral_convolutions, self.output_convolutions, features[: self.num_fpn_levels][::-1]
        ):
            lateral = lateral_conv(feature)
            upsampled = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output_conv(lateral + upsampled))

        return Mask2FormerPixelDecoderOutput(
            multi_scale_features=tuple(outputs[: self.num_feature_levels]),
            mask_features=self.mask_projection(outputs[-1]),  # (B, mask_feature_size, H/4, W/4)
            level_valid_masks=None if valid_regions is None else tuple(level_masks),
        )
