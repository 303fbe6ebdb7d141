"""Outputs of each stage: the contracts between backbone, pixel decoder, transformer decoder and heads.

Field names and order follow transformers' Mask2Former outputs, so code written against transformers (post-processing,
training loops) reads ours unchanged. ``Mask2FormerForUniversalSegmentationOutput`` adds ``loss_dict`` (the weighted
loss terms behind ``loss``) as its last field, so positional access to the other fields is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class Mask2FormerPixelDecoderOutput(ModelOutput):
    """Output of the pixel decoder.

    Args:
        multi_scale_features (`tuple[torch.Tensor]`):
            Three maps `(B, C, H/s, W/s)` at strides 32, 16, 8 (low to high resolution): the memory of the
            transformer decoder.
        mask_features (`torch.Tensor` of shape `(B, mask_feature_size, H/4, W/4)`):
            Per-pixel embeddings that the query mask embeddings are dotted with.
        level_valid_masks (`tuple[torch.Tensor]`, *optional*):
            `(B, H/s, W/s)` bool per multi-scale feature, True on cells of real pixels; None without padding.
    """

    multi_scale_features: tuple[torch.Tensor, ...] | None = None
    mask_features: torch.Tensor | None = None
    level_valid_masks: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerPixelLevelModuleOutput(ModelOutput):
    """Output of backbone + pixel decoder.

    Args:
        encoder_last_hidden_state (`torch.Tensor` of shape `(B, C, H/32, W/32)`): the backbone's last feature map.
        encoder_hidden_states (`tuple[torch.Tensor]`, *optional*): the backbone's four feature maps (strides 4-32).
        decoder_last_hidden_state (`torch.Tensor` of shape `(B, mask_feature_size, H/4, W/4)`): the mask features.
        decoder_hidden_states (`tuple[torch.Tensor]`): the pixel decoder's maps at strides 32, 16, 8.
        level_valid_masks (`tuple[torch.Tensor]`, *optional*): their valid cells `(B, H/s, W/s)`, None without
            padding.
    """

    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    level_valid_masks: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerMaskedAttentionDecoderOutput(ModelOutput):
    """Output of the masked-attention transformer decoder.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, Q, hidden_dim)`): query features after the last layer.
        hidden_states (`tuple[torch.Tensor]`, *optional*): query features `(Q, B, hidden_dim)` (transformers' layout)
            entering each layer, plus the last layer's output; on the autograd path.
        attentions (`tuple[torch.Tensor]`, *optional*): self-attention weights `(B, heads, Q, Q)` per layer.
        masks_queries_logits (`tuple[torch.Tensor]`): mask logits `(B, Q, H/4, W/4)` before the first layer and after
            every layer.
        intermediate_hidden_states (`tuple[torch.Tensor]`): the layer-normed query features `(Q, B, hidden_dim)`
            the heads read, before the first layer and after every layer; on the autograd path.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    masks_queries_logits: tuple[torch.Tensor, ...] | None = None
    intermediate_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerModelOutput(ModelOutput):
    """Output of [`Mask2FormerModel`]: everything the heads need.

    Args:
        encoder_last_hidden_state (`torch.Tensor` of shape `(B, C, H/32, W/32)`): backbone's last feature map.
        pixel_decoder_last_hidden_state (`torch.Tensor` of shape `(B, mask_feature_size, H/4, W/4)`): mask features.
        transformer_decoder_last_hidden_state (`torch.Tensor` of shape `(B, Q, hidden_dim)`): final query features.
        encoder_hidden_states (`tuple[torch.Tensor]`, *optional*): backbone feature maps.
        pixel_decoder_hidden_states (`tuple[torch.Tensor]`, *optional*): pixel decoder maps at strides 32, 16, 8.
        transformer_decoder_hidden_states (`tuple[torch.Tensor]`, *optional*): query features `(Q, B, hidden_dim)`
            entering each decoder layer, plus the last layer's output.
        transformer_decoder_intermediate_states (`tuple[torch.Tensor]`): layer-normed query features
            `(Q, B, hidden_dim)` per prediction.
        masks_queries_logits (`tuple[torch.Tensor]`): mask logits `(B, Q, H/4, W/4)` per prediction.
        attentions (`tuple[torch.Tensor]`, *optional*): self-attention weights per decoder layer.
    """

    encoder_last_hidden_state: torch.Tensor | None = None
    pixel_decoder_last_hidden_state: torch.Tensor | None = None
    transformer_decoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_intermediate_states: tuple[torch.Tensor, ...] | None = None
    masks_queries_logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class Mask2FormerForUniversalSegmentationOutput(ModelOutput):
    """Output of [`Mask2FormerForUniversalSegmentation`]; the image processor's post-processing reads it.

    Args:
        loss (`torch.Tensor`, *optional*): weighted sum of all loss terms, when labels are given.
        class_queries_logits (`torch.Tensor` of shape `(B, Q, num_labels + 1)`): class logits of the last layer;
            the last class is "no object".
        masks_queries_logits (`torch.Tensor` of shape `(B, Q, H/4, W/4)`): mask logits of the last layer.
        auxiliary_logits (`list[dict[str, torch.Tensor]]`, *optional*): ``{"class_queries_logits",
            "masks_queries_logits"}`` of every earlier prediction, first to last.
        encoder_last_hidden_state, pixel_decoder_last_hidden_state, transformer_decoder_last_hidden_state,
        encoder_hidden_states, pixel_decoder_hidden_states, transformer_decoder_hidden_states, attentions:
            as in [`Mask2FormerModelOutput`].
        loss_dict (`dict[str, torch.Tensor]`, *optional*): the weighted loss terms summed into ``loss``
            (``loss_cross_entropy``, ``loss_mask``, ``loss_dice`` and ``<term>_<i>`` per auxiliary prediction).
    """

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    auxiliary_logits: list[dict[str, torch.Tensor]] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    pixel_decoder_last_hidden_state: torch.Tensor | None = None
    transformer_decoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


__all__ = [
    "Mask2FormerForUniversalSegmentationOutput",
    "Mask2FormerMaskedAttentionDecoderOutput",
    "Mask2FormerModelOutput",
    "Mask2FormerPixelDecoderOutput",
    "Mask2FormerPixelLevelModuleOutput",
]
