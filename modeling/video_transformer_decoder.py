"""Video transformer decoder: the image decoder's queries and layers, attending to the space-time memory of a clip.

    per level l (strides 32, 16, 8): the T frames' maps, flattened to one memory of T*h_l*w_l keys (index t*h*w + y*w
        + x), with the 3-D sine position embedding (video_position_embedding.py)
    prediction 0 from the queries alone: one class per query and one mask per frame (a tube, video_heads.py)
    layer i attends to level i % 3 (masked cross-attention inside the previous tube -> self-attention -> FFN)

Only the forward differs from the image model: the modules and their parameter names are the image model's
(``Mask2FormerTransformerModule``, ``Mask2FormerMaskedAttentionDecoder``), so image and video checkpoints are
interchangeable, and the layers themselves (``Mask2FormerMaskedAttentionDecoderLayer``) take any number of keys.
"""

from __future__ import annotations

import torch

from .configuration_mask2former import Mask2FormerConfig
from .outputs import Mask2FormerMaskedAttentionDecoderOutput
from .transformer_decoder import Mask2FormerMaskedAttentionDecoder, Mask2FormerTransformerModule
from .video_heads import VideoMask2FormerMaskPredictor
from .video_position_embedding import VideoMask2FormerSinePositionEmbedding


class VideoMask2FormerMaskedAttentionDecoder(Mask2FormerMaskedAttentionDecoder):
    """The image decoder with the tube predictor: memories are a clip's `(B, T*h*w, C)` keys, masks are tubes."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.mask_predictor = VideoMask2FormerMaskPredictor(config.hidden_dim, config.mask_feature_size)


class VideoMask2FormerTransformerModule(Mask2FormerTransformerModule):
    """Prepares the queries and the three space-time feature levels of a clip, then runs the masked-attention decoder.

    Args:
        in_features (`int`): channels of the pixel decoder's multi-scale features.
        config (`VideoMask2FormerConfig`): also reads ``use_temporal_position_embedding`` (default True).
    """

    def __init__(self, in_features: int, config: Mask2FormerConfig) -> None:
        super().__init__(in_features, config)
        self.position_embedder = VideoMask2FormerSinePositionEmbedding(
            num_features=config.hidden_dim // 2,
            temporal=getattr(config, "use_temporal_position_embedding", True),
        )
        self.decoder = VideoMask2FormerMaskedAttentionDecoder(config)

    def forward(
        self,
        multi_scale_features: tuple[torch.Tensor, ...],
        mask_features: torch.Tensor,
        num_frames: int,
        level_valid_masks: tuple[torch.Tensor, ...] | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> Mask2FormerMaskedAttentionDecoderOutput:
        """
        Args:
            multi_scale_features: `(B*T, C, h_l, w_l)` at strides 32, 16, 8, frame index ``b * T + t``.
            mask_features: `(B*T, D, H/4, W/4)`, the same frame order.
            num_frames: T, the frames of each clip.
            level_valid_masks: `(B, h_l, w_l)` bool per level, True on real pixels (one mask per clip); None means
                no padding.

        Returns:
            the decoder output; its ``masks_queries_logits`` are tubes `(B, Q, T, H/4, W/4)`.
        """
        if mask_features.shape[0] % num_frames:
            raise ValueError(
                f"{mask_features.shape[0]} frames do not split into clips of num_frames={num_frames}; pass "
                "(batch * num_frames, ...) frame maps."
            )
        batch_size = mask_features.shape[0] // num_frames
        memories, positions, sizes, key_valid_masks = [], [], [], []
        for level, features in enumerate(multi_scale_features):
            height, width = features.shape[-2:]
            mask = None if level_valid_masks is None else level_valid_masks[level]
            position = self.position_embedder(
                batch_size, num_frames, height, width, features.device, features.dtype, mask
            )
            projected = self.input_projections[level](features) + self.level_embed.weight[level][:, None, None]
            # (B*T, C, h, w) -> (B, T, C, h*w) -> (B, T, h*w, C) -> (B, T*h*w, C)
            memories.append(projected.view(batch_size, num_frames, -1, height * width).transpose(2, 3).flatten(1, 2))
            # (B, T, C, h, w) -> (B, T, C, h*w) -> (B, T*h*w, C)
            positions.append(position.flatten(3).transpose(2, 3).flatten(1, 2))
            sizes.append((height, width))
            # (B, h, w) -> (B, h*w) -> (B, T*h*w): every frame of a clip is padded alike
            key_valid_masks.append(None if mask is None else mask.flatten(1).repeat(1, num_frames))

        # (Q, C) -> (B, Q, C)
        query_position_embeddings = self.queries_embedder.weight[None].expand(batch_size, -1, -1)
        query_features = self.queries_features.weight[None].expand(batch_size, -1, -1)
        # (B*T, D, H, W) -> (B, T, D, H, W)
        clip_mask_features = mask_features.view(batch_size, num_frames, *mask_features.shape[1:])
        return self.decoder(
            query_features,
            query_position_embeddings,
            memories,
            positions,
            sizes,
            clip_mask_features,
            key_valid_masks,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
