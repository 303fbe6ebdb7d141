"""Mask2Former (Cheng et al., CVPR 2022), assembled from its stages as in the paper's figure:

    pixel_values (B, 3, H, W) [+ pixel_mask (B, H, W) -> valid regions, read once]         (padding.py)
      -> backbone                          4 maps, strides 4, 8, 16, 32                       (backbone.py)
      -> pixel decoder                     3 maps, strides 32, 16, 8 (+ their valid masks) and mask features at
                                           stride 4                                           (pixel_decoder.py)
      -> transformer decoder (+ heads)     per layer: mask logits (B, Q, H/4, W/4) and the next attention mask
                                                                                   (transformer_decoder.py, heads.py)
      -> class head                        per layer: class logits (B, Q, K + 1)
      -> loss with labels                  (loss.py)

State-dict keys and ``config.json`` are those of transformers' ``Mask2FormerForUniversalSegmentation``, so checkpoints
load both ways. Unlike transformers, ``pixel_mask`` is honoured (see padding.py): an image gives the same outputs on
its valid region alone or padded in a batch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .backbone import backbone_features, build_backbone
from .configuration_mask2former import Mask2FormerConfig
from .heads import Mask2FormerPredictionBlock
from .loss import Mask2FormerLoss
from .outputs import (
    Mask2FormerForUniversalSegmentationOutput,
    Mask2FormerModelOutput,
    Mask2FormerPixelLevelModuleOutput,
)
from .padding import SIZE_DIVISOR, ValidRegions, run_per_valid_region, valid_regions
from .pixel_decoder import Mask2FormerMultiscaleDeformableAttention, Mask2FormerPixelDecoder
from .transformer_decoder import Mask2FormerMaskedAttentionDecoderLayer, Mask2FormerTransformerModule

# Stages whose parameters follow the paper's (and transformers') rules rather than torch's defaults; each one knows its
# own rule (``initialize_parameters(config)``).
_STAGES_WITH_OWN_INITIALIZATION = (
    Mask2FormerMultiscaleDeformableAttention,
    Mask2FormerPixelDecoder,
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerTransformerModule,
    Mask2FormerPredictionBlock,
)


class Mask2FormerPixelLevelModule(nn.Module):
    """Backbone + pixel decoder.

    Without padding (no valid regions) this is one batched call. With padding, each stage runs per valid region
    (``padding.run_per_valid_region``): each image on its valid region rounded up to 32, the input the processor gives
    it alone (images of one rounded size share a call), and the stage's maps are zero-padded back to the batch size.
    Convolutions, normalisation statistics and windows then never see another image's padding.
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.encoder = build_backbone(config)
        self.decoder = Mask2FormerPixelDecoder(config, feature_channels=self.encoder.channels)

    def _backbone(self, inputs: list[torch.Tensor], regions: ValidRegions | None) -> list[torch.Tensor]:
        return backbone_features(self.encoder, inputs[0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        valid_regions: ValidRegions | None = None,
        output_hidden_states: bool = False,
    ) -> Mask2FormerPixelLevelModuleOutput:
        """`(B, 3, H, W)` (+ the batch's valid regions, None = no padding) -> backbone and pixel decoder maps."""
        features = run_per_valid_region(self._backbone, [pixel_values], valid_regions)
        decoded = run_per_valid_region(self.decoder, features, valid_regions)
        return Mask2FormerPixelLevelModuleOutput(
            encoder_last_hidden_state=features[-1],
            encoder_hidden_states=tuple(features) if output_hidden_states else None,
            decoder_last_hidden_state=decoded.mask_features,
            decoder_hidden_states=decoded.multi_scale_features,
            level_valid_masks=decoded.level_valid_masks,
        )


class Mask2FormerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and checkpoint plumbing shared by the Mask2Former models."""

    config_class = Mask2FormerConfig
    config: Mask2FormerConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats models defined outside its package as "custom code" and then skips every module without
        # parameters of its own (the decoder layers, the deformable attention...), leaving them uninitialised. Our
        # _init_weights only writes through transformers.initialization, which itself skips loaded tensors, so the
        # stock per-module initialisation is safe here.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised before their parents, so a parent's rule overrides the generic one of its
        # children (e.g. the decoder layers' xavier over nn.Linear's normal). The rules are transformers'.
        if isinstance(module, _STAGES_WITH_OWN_INITIALIZATION):
            module.initialize_parameters(self.config)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.BatchNorm2d):
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, Mask2FormerLoss):
            # the class weights of the cross-entropy: 1 per class, no_object_weight for "no object"
            class_weights = torch.ones_like(module.empty_weight)
            class_weights[-1] = self.config.no_object_weight
            init.copy_(module.empty_weight, class_weights)
        else:
            super()._init_weights(module)


def _check_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None, num_channels: int) -> None:
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}; "
            "add a batch dimension with pixel_values[None] for a single image."
        )
    batch_size, channels, height, width = pixel_values.shape
    if channels != num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels but the backbone expects {num_channels} "
            f"(shape {tuple(pixel_values.shape)}); pass (batch, {num_channels}, height, width)."
        )
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
        raise ValueError(
            f"pixel_values height and width must be multiples of {SIZE_DIVISOR}, got {height}x{width}; "
            "Mask2FormerImageProcessor pads images to such a size and returns the matching pixel_mask."
        )
    if pixel_mask is not None and tuple(pixel_mask.shape) != (batch_size, height, width):
        raise ValueError(
            f"pixel_mask must have shape (batch, height, width) = {(batch_size, height, width)} to match "
            f"pixel_values, got {tuple(pixel_mask.shape)}."
        )


class Mask2FormerModel(Mask2FormerPreTrainedModel):
    """Backbone, pixel decoder and transformer decoder; returns the per-layer mask logits and query features.

    Args:
        config (`Mask2FormerConfig`).
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.pixel_level_module = Mask2FormerPixelLevelModule(config)
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Mask2FormerModelOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): H and W multiples of 32.
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): 1 on real pixels, 0 on padding (bottom and
                right). None means no padding; this path is a single batched pass without host synchronisation.
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
        _check_inputs(pixel_values, pixel_mask, num_channels)
        regions = valid_regions(pixel_mask)  # None without padding

        pixel_level = self.pixel_level_module(pixel_values, regions, output_hidden_states)
        decoded = self.transformer_module(
            pixel_level.decoder_hidden_states,
            pixel_level.decoder_last_hidden_state,
            pixel_level.level_valid_masks,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        output = Mask2FormerModelOutput(
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


class Mask2FormerForUniversalSegmentation(Mask2FormerPreTrainedModel):
    """Mask2Former with its class head: class and mask logits per query for semantic, instance and panoptic
    segmentation (turned into maps by ``Mask2FormerImageProcessor.post_process_*``), and the loss with labels.

    Args:
        config (`Mask2FormerConfig`).

    Example:

    ```python
    >>> from mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    >>> model = Mask2FormerForUniversalSegmentation.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
    >>> processor = Mask2FormerImageProcessor.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
    >>> outputs = model(**processor(images=image, return_tensors="pt"))
    >>> outputs.class_queries_logits.shape, outputs.masks_queries_logits.shape  # (1, 100, 134), (1, 100, H/4, W/4)
    ```
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.model = Mask2FormerModel(config)
        self.weight_dict: dict[str, float] = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weight_dict)  # holds criterion.empty_weight
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Mask2FormerForUniversalSegmentationOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): H and W multiples of 32.
            mask_labels (`list[torch.Tensor]`, *optional*): per image `(N_i, H, W)` binary target masks.
            class_labels (`list[torch.LongTensor]`, *optional*): per image `(N_i,)` target classes.
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): 1 on real pixels, 0 on padding.
            output_hidden_states (`bool`, *optional*): return every stage's hidden states.
            output_auxiliary_logits (`bool`, *optional*): return the earlier layers' predictions.
            output_attentions (`bool`, *optional*): return the decoder's self-attention weights.
            return_dict (`bool`, *optional*): return a ModelOutput (default) or a tuple.

        Returns:
            [`Mask2FormerForUniversalSegmentationOutput`]: ``class_queries_logits`` `(B, Q, K + 1)`,
            ``masks_queries_logits`` `(B, Q, H/4, W/4)`, and with labels ``loss`` and ``loss_dict``.
        """
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("Pass mask_labels and class_labels together (both or neither) to compute the loss.")
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_auxiliary_logits = (
            self.config.output_auxiliary_logits if output_auxiliary_logits is None else output_auxiliary_logits
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        # one class prediction per decoder prediction, read batch-first like the mask head: (Q, B, C) -> (B, Q, K + 1)
        class_logits = [
            self.class_predictor(state.transpose(0, 1)) for state in outputs.transformer_decoder_intermediate_states
        ]
        mask_logits = outputs.masks_queries_logits
        auxiliary_logits = [
            {"masks_queries_logits": masks, "class_queries_logits": classes}
            for masks, classes in zip(mask_logits[:-1], class_logits[:-1])
        ]

        loss, loss_dict = None, None
        if mask_labels is not None:
            loss_dict = self.criterion(
                masks_queries_logits=mask_logits[-1],
                class_queries_logits=class_logits[-1],
                mask_labels=mask_labels,
                class_labels=class_labels,
                auxiliary_predictions=auxiliary_logits if self.config.use_auxiliary_loss else None,
            )
            # "loss_mask_3" takes the weight of "loss_mask"
            loss_dict = {
                name: value * next((weight for key, weight in self.weight_dict.items() if name.startswith(key)), 1.0)
                for name, value in loss_dict.items()
            }
            loss = sum(loss_dict.values())

        output = Mask2FormerForUniversalSegmentationOutput(
            loss=loss,
            class_queries_logits=class_logits[-1],
            masks_queries_logits=mask_logits[-1],
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=outputs.pixel_decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=outputs.transformer_decoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            pixel_decoder_hidden_states=outputs.pixel_decoder_hidden_states,
            transformer_decoder_hidden_states=outputs.transformer_decoder_hidden_states,
            attentions=outputs.attentions,
            loss_dict=loss_dict,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["Mask2FormerForUniversalSegmentation", "Mask2FormerModel", "Mask2FormerPreTrainedModel"]
