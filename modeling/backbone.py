"""Backbone: any transformers AutoBackbone (Swin, ResNet, ConvNeXt, ...) or a timm model -> 4 maps at strides 4-32.

The backbone module is stored as-is (no wrapper) under ``pixel_level_module.encoder`` so that its state-dict keys
are those of transformers' checkpoints.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers.backbone_utils import load_backbone

from .configuration_mask2former import Mask2FormerConfig

TIMM_INSTALL_HINT = (
    "This config selects a timm backbone ({name!r}), which needs the `timm` package: `pip install timm` "
    "(timm also installs torchvision; pick the torchvision build that matches your torch). Or use a transformers "
    "backbone instead: Mask2FormerConfig(backbone_config=SwinConfig(out_features=['stage1', 'stage2', 'stage3', "
    "'stage4']))."
)


def build_backbone(config: Mask2FormerConfig) -> nn.Module:
    """Builds the (randomly initialised) backbone of ``config`` and checks it gives four feature maps.

    Raises:
        ImportError: a timm backbone was asked for and timm is not installed (the message says how to install it).
        ValueError: the backbone does not give exactly four feature maps.
    """
    backbone_config = config.backbone_config
    if backbone_config is not None and backbone_config.model_type == "timm_backbone":
        if importlib.util.find_spec("timm") is None:
            raise ImportError(TIMM_INSTALL_HINT.format(name=backbone_config.backbone))
    backbone = load_backbone(config)
    num_maps = len(backbone.channels)
    if num_maps != 4:
        raise ValueError(
            f"Mask2Former needs 4 backbone feature maps (strides 4, 8, 16, 32), but the backbone gives {num_maps} "
            f"(out_features={getattr(backbone, 'out_features', None)}); set the backbone config's "
            "out_features=['stage1', 'stage2', 'stage3', 'stage4']."
        )
    return backbone


def backbone_features(backbone: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """`(B, 3, H, W)` -> four maps `(B, C_i, H / s_i, W / s_i)`, strides ``s_i`` = 4, 8, 16, 32."""
    return list(backbone(pixel_values).feature_maps)
