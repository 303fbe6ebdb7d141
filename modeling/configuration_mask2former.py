"""Mask2Former configuration: transformers' schema, so checkpoints move both ways without conversion.

We subclass transformers' ``Mask2FormerConfig`` rather than restate its ~30 fields: the dataclass schema, defaults,
``model_type`` and serialisation stay *identical* by construction, which is what checkpoint compatibility needs
(DESIGN.md, decision 1). What we change:

- any backbone with four feature maps (Swin, ResNet, ConvNeXt, ...) is accepted without the "only Swin is supported"
  warning;
- ``backbone="<timm name>", use_timm_backbone=True`` builds a ``TimmBackboneConfig`` locally instead of querying the
  Hub; building the model from it then needs timm (the error says how to install it).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Mask2FormerConfig as _TransformersMask2FormerConfig
from transformers import PreTrainedConfig, TimmBackboneConfig


@strict
class Mask2FormerConfig(_TransformersMask2FormerConfig):
    r"""Configuration of a Mask2Former model, field for field the one of transformers.

    Main fields (all keep transformers' defaults, those of ``facebook/mask2former-swin-small-coco-instance``):

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the backbone (any AutoBackbone model type with four feature maps at strides 4, 8, 16, 32).
            Defaults to Swin with depths ``[2, 2, 18, 2]``.
        feature_size (`int`, defaults to 256): channels of the pixel decoder's feature maps.
        mask_feature_size (`int`, defaults to 256): channels of the stride-4 mask features.
        hidden_dim (`int`, defaults to 256): width of the transformer decoder.
        encoder_feedforward_dim (`int`, defaults to 1024): FFN width of the deformable encoder layers.
        encoder_layers (`int`, defaults to 6): deformable encoder layers in the pixel decoder.
        decoder_layers (`int`, defaults to 10): transformer decoder layers **plus one** (the first prediction is
            made from the learnable queries before any layer), so 10 means 9 masked-attention layers.
        num_attention_heads (`int`, defaults to 8): heads in every attention.
        dim_feedforward (`int`, defaults to 2048): FFN width of the transformer decoder layers.
        pre_norm (`bool`, defaults to `False`): pre-LayerNorm decoder layers.
        num_queries (`int`, defaults to 100): object queries.
        no_object_weight (`float`, defaults to 0.1): cross-entropy weight of the "no object" class.
        class_weight, mask_weight, dice_weight (`float`, defaults to 2.0, 5.0, 5.0): loss (and matching) weights.
        train_num_points (`int`, defaults to 12544), oversample_ratio (`float`, defaults to 3.0),
        importance_sample_ratio (`float`, defaults to 0.75): point sampling of the mask losses.
        use_auxiliary_loss (`bool`, defaults to `True`): supervise every intermediate prediction.
        feature_strides (`list[int]`, defaults to ``(4, 8, 16, 32)``): strides of the backbone's feature maps.
        ignore_value (`int`, defaults to 255): label ignored in semantic maps.
        num_labels, id2label, label2id: the classes (the model predicts ``num_labels + 1`` with "no object").

    Extra keyword arguments ``backbone`` and ``use_timm_backbone=True`` select a timm backbone by name.

    Example:

    ```python
    >>> from transformers import SwinConfig
    >>> from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    >>> backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
    ...                       out_features=["stage1", "stage2", "stage3", "stage4"])
    >>> config = Mask2FormerConfig(backbone_config=backbone, num_labels=133)
    >>> model = Mask2FormerForUniversalSegmentation(config)
    ```
    """

    model_type = "mask2former"
    # Structural constants of the paper's architecture. transformers' schema has no fields for them, so they are
    # class attributes (read as ``config.num_feature_levels``), not serialised: saved configs stay transformers'.
    num_feature_levels = 3  # backbone maps the deformable encoder and the decoder's round robin use (strides 32-8)
    encoder_n_points = 4  # deformable-attention sampling points per level and head

    def __post_init__(self, **kwargs):
        # The timm option, resolved here without the Hub lookup transformers would make for a bare backbone name.
        use_timm_backbone = kwargs.pop("use_timm_backbone", False)
        backbone_name = kwargs.pop("backbone", None)
        backbone_kwargs = kwargs.pop("backbone_kwargs", None) or {}
        kwargs.pop("use_pretrained_backbone", None)
        if backbone_name is not None:
            if self.backbone_config is not None:
                raise ValueError(f"Got both backbone={backbone_name!r} and backbone_config; give only one of them.")
            if not use_timm_backbone:
                raise ValueError(
                    f"backbone={backbone_name!r} names a timm model, so pass use_timm_backbone=True as well, "
                    "or pass backbone_config=<a transformers backbone config> instead."
                )
            backbone_kwargs = {"out_indices": (1, 2, 3, 4), **backbone_kwargs}
            self.backbone_config = TimmBackboneConfig(backbone=backbone_name, **backbone_kwargs)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        # Skip the parent's "only Swin is supported" warning: any backbone with four feature maps works here.
        PreTrainedConfig.validate_architecture(self)


__all__ = ["Mask2FormerConfig"]
