"""Video Mask2Former (Cheng et al., "Mask2Former for Video Instance Segmentation", 2021): the image model on a clip.

    pixel_values_videos (B, T, 3, H, W) [+ pixel_mask (B, H, W), one per clip]
      -> backbone + pixel decoder, per frame     on (B*T, 3, H, W)                      (modeling_mask2former.py)
      -> video transformer decoder (+ tube heads) queries attend to all T frames' keys; per layer mask tubes
                                                  (B, Q, T, H/4, W/4) and the next space-time attention mask
                                                                                  (video_transformer_decoder.py)
      -> class head                              per layer: one class per query and clip (B, Q, K + 1)
      -> tube loss with labels                   (loss.py and matcher.py take tubes)

The state-dict keys are exactly those of ``Mask2FormerForUniversalSegmentation``: an image checkpoint (the paper
starts from the COCO-instance model) loads with ``from_pretrained``, the class head re-initialised with
``ignore_mismatched_sizes=True`` when the classes differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForUniversalSegmentation

from .configuration_video_mask2former import VideoMask2FormerConfig
from .loss import Mask2FormerLoss
from .modeling_mask2former import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerPixelLevelModule,
    Mask2FormerPreTrainedModel,
    _check_inputs,
)
from .outputs import Mask2FormerForUniversalSegmentationOutput, Mask2FormerModelOutput
from .padding import valid_regions
from .video_transformer_decoder import VideoMask2FormerTransformerModule


@dataclass
class VideoMask2FormerModelOutput(Mask2FormerModelOutput):
    """Output of [`VideoMask2FormerModel`]: the fields of [`Mask2FormerModelOutput`], per clip.

    Per-frame maps (``encoder_last_hidden_state``, ``pixel_decoder_last_hidden_state`` and the hidden states of the
    backbone and pixel decoder) are frame-major `(B*T, C, h, w)`, frame ``t`` of clip ``b`` at ``b * T + t``;
    ``masks_queries_logits`` are mask tubes `(B, Q, T, H/4, W/4)` per prediction.
    """


@dataclass
class VideoMask2FormerForVideoSegmentationOutput(Mask2FormerForUniversalSegmentationOutput):
    """Output of [`VideoMask2FormerForVideoSegmentation`]; the video processor's post-processing reads it.

    Args:
        loss (`torch.Tensor`, *optional*): weighted sum of the loss terms, when labels are given.
        class_queries_logits (`torch.Tensor` of shape `(B, Q, num_labels + 1)`): one class per query and clip; the
            last class is "no object".
        masks_queries_logits (`torch.Tensor` of shape `(B, Q, T, H/4, W/4)`): mask-tube logits of the last layer.
        auxiliary_logits (`list[dict[str, torch.Tensor]]`, *optional*): the earlier predictions, same shapes.
        loss_dict (`dict[str, torch.Tensor]`, *optional*): the weighted loss terms summed into ``loss``.
        Other fields as in [`VideoMask2FormerModelOutput`].
    """


class VideoMask2FormerPreTrainedModel(Mask2FormerPreTrainedModel):
    """The image model's initialisation and checkpoint plumbing, for clip inputs."""

    config_class = VideoMask2FormerConfig
    config: VideoMask2FormerConfig
    main_input_name = "pixel_values_videos"
    input_modalities = ("video",)


def _check_video_inputs(
    pixel_values_videos: torch.Tensor, pixel_mask: torch.Tensor | None, num_channels: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validates a clip batch; returns the frames `(B*T, 3, H, W)` and their masks `(B*T, H, W)` (or None)."""
    if pixel_values_videos.dim() != 5:
        raise ValueError(
            "pixel_values_videos must be 5-D (batch, frames, channels, height, width), got shape "
            f"{tuple(pixel_values_videos.shape)}; a single clip needs pixel_values_videos[None], a batch of images "
            "pixel_values[:, None] (one-frame clips)."
        )
    batch_size, num_frames, _, height, width = pixel_values_videos.shape
    if pixel_mask is not None and tuple(pixel_mask.shape) != (batch_size, height, width):
        raise ValueError(
            f"pixel_mask must have shape (batch, height, width) = {(batch_size, height, width)}: one mask per clip, "
            f"shared by its {num_frames} frames; got {tuple(pixel_mask.shape)}."
        )
    frames = pixel_values_videos.flatten(0, 1)  # (B, T, 3, H, W) -> (B*T, 3, H, W)
    # (B, H, W) -> (B, T, H, W) -> (B*T, H, W)
    frame_masks = None if pixel_mask is None else pixel_mask[:, None].expand(-1, num_frames, -1, -1).flatten(0, 1)
    _check_inputs(frames, frame_masks, num_channels)
    return frames, frame_masks


class VideoMask2FormerModel(VideoMask2FormerPreTrainedModel):
    """Backbone and pixel decoder per frame, and the video transformer decoder over the clip.

    Args:
        config (`VideoMask2FormerConfig`).
    """

    def __init__(self, config: VideoMask2FormerConfig) -> None:
        super().__init__(config)
        self.pixel_level_module = Mask2FormerPixelLevelModule(config)
        self.transformer_module = VideoMask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.post_init()

    def forward(
        self,
        pixel_values_videos: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VideoMask2FormerModelOutput | tuple:
        """
        Args:
            pixel_values_videos (`torch.Tensor` of shape `(B, T, 3, H, W)`): clips of T frames, H and W multiples
                of 32.
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): 1 on real pixels, 0 on padding (bottom and
                right), one mask per clip. A clip gives the same outputs alone or padded in a batch.
            output_hidden_states (`bool`, *optional*): return every stage's hidden states.
            output_attentions (`bool`, *optional*): return the decoder's self-attention weights.
            return_dict (`bool`, *optional*): return a ModelOutput (default) or a tuple.
        """
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict

        num_channels = getattr(self.config.backbone_config, "num_channels", 3)
        frames, frame_masks = _check_video_inputs(pixel_values_videos, pixel_mask, num_channels)
        batch_size, num_frames = pixel_values_videos.shape[:2]
        pixel_level = self.pixel_level_module(frames, valid_regions(frame_masks), output_hidden_states)
        # a clip's valid cells per level are its first frame's (all frames share them): (B*T, h, w) -> (B, h, w)
        clip_masks = pixel_level.level_valid_masks
        if clip_masks is not None:
            clip_masks = tuple(mask.view(batch_size, num_frames, *mask.shape[1:])[:, 0] for mask in clip_masks)
        decoded = self.transformer_module(
            pixel_level.decoder_hidden_states,
            pixel_level.decoder_last_hidden_state,
            num_frames,
            clip_masks,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        output = VideoMask2FormerModelOutput(
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_level.decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=decoded.last_hidden_state,
            encoder_hidden_states=pixel_level.encoder_hidden_states if output_hidden_states else None,
            pixel_decoder_hidden_states=pixel_level.decoder_hidden_states if output_hidden_states else None,
            transformer_decoder_hidden_states=decoded.hidden_states,
            transformer_decoder_intermediate_states=decoded.intermediate_hidden_states,
            masks_queries_logits=decoded.masks_queries_logits,
            attentions=decoded.attentions,
        )
        return output if return_dict else output.to_tuple()


class VideoMask2FormerForVideoSegmentation(VideoMask2FormerPreTrainedModel):
    """Video Mask2Former with its class head: per query one class for the clip and one mask tube (a mask per frame),
    turned into video instances by ``VideoMask2FormerVideoProcessor.post_process_video_instance_segmentation``, and
    the tube loss with labels.

    Args:
        config (`VideoMask2FormerConfig`).

    Example:

    ```python
    >>> from mask2former import VideoMask2FormerForVideoSegmentation
    >>> # an image checkpoint initialises the video model; the class head is re-initialised for 40 classes
    >>> model = VideoMask2FormerForVideoSegmentation.from_pretrained(
    ...     "facebook/mask2former-swin-tiny-coco-instance", num_labels=40, ignore_mismatched_sizes=True
    ... )
    >>> outputs = model(pixel_values_videos=torch.randn(1, 5, 3, 384, 384))
    >>> outputs.class_queries_logits.shape, outputs.masks_queries_logits.shape  # (1, 100, 41), (1, 100, 5, 96, 96)
    ```
    """

    def __init__(self, config: VideoMask2FormerConfig) -> None:
        super().__init__(config)
        self.model = VideoMask2FormerModel(config)
        self.weight_dict: dict[str, float] = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        # the image model's loss: its matcher and mask losses take tubes (points shared by a tube's frames in the
        # matching cost, per-frame points in the mask losses, normalised by the number of tubes)
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weight_dict)
        self.post_init()

    def forward(
        self,
        pixel_values_videos: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VideoMask2FormerForVideoSegmentationOutput | tuple:
        """
        Args:
            pixel_values_videos (`torch.Tensor` of shape `(B, T, 3, H, W)`): H and W multiples of 32.
            mask_labels (`list[torch.Tensor]`, *optional*): per clip `(N_i, T, H, W)` binary target tubes (an
                instance absent from a frame has an empty mask there).
            class_labels (`list[torch.LongTensor]`, *optional*): per clip `(N_i,)` target classes.
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): 1 on real pixels, 0 on padding.
            output_hidden_states (`bool`, *optional*): return every stage's hidden states.
            output_auxiliary_logits (`bool`, *optional*): return the earlier layers' predictions.
            output_attentions (`bool`, *optional*): return the decoder's self-attention weights.
            return_dict (`bool`, *optional*): return a ModelOutput (default) or a tuple.

        Returns:
            [`VideoMask2FormerForVideoSegmentationOutput`]: ``class_queries_logits`` `(B, Q, K + 1)`,
            ``masks_queries_logits`` `(B, Q, T, H/4, W/4)`, and with labels ``loss`` and ``loss_dict``.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        # The image model's heads and loss, unchanged: its forward reads only self.model (here the video model, whose
        # tubes its class head, auxiliary predictions and tube-aware criterion take as they are), class_predictor,
        # criterion, weight_dict and config.
        output = Mask2FormerForUniversalSegmentation.forward(
            self,
            pixel_values_videos,
            mask_labels=mask_labels,
            class_labels=class_labels,
            pixel_mask=pixel_mask,
            output_hidden_states=output_hidden_states,
            output_auxiliary_logits=output_auxiliary_logits,
            output_attentions=output_attentions,
            return_dict=True,
        )
        output = VideoMask2FormerForVideoSegmentationOutput(**output)
        return output if return_dict else output.to_tuple()


# The Auto classes build these for model_type "video_mask2former" once this module is imported (``from mask2former
# import VideoMask2FormerForVideoSegmentation``); transformers' own video segmenter (VidEoMT) sits under
# AutoModelForUniversalSegmentation too.
AutoModel.register(VideoMask2FormerConfig, VideoMask2FormerModel, exist_ok=True)
AutoModelForUniversalSegmentation.register(VideoMask2FormerConfig, VideoMask2FormerForVideoSegmentation, exist_ok=True)

__all__ = [
    "VideoMask2FormerForVideoSegmentation",
    "VideoMask2FormerForVideoSegmentationOutput",
    "VideoMask2FormerModel",
    "VideoMask2FormerModelOutput",
    "VideoMask2FormerPreTrainedModel",
]
