"""The model families of the package, looked up by ``model_type``: which classes build, run and export a model.

A family is a config class, the model class trained and run for inference, its image processor and the tasks it
does. The trainer, ``mask2former segment``, ``mask2former export-onnx`` and the demo take a model of any family
through :func:`family_of`, which reads ``model_type`` from a config (an object, a ``config.json`` dict, a folder or a
Hub id) and returns the family's entry of ``FAMILIES``: a plain dict, no registry (DESIGN.md, decision 8). Adding a
family is one entry here.

Example::

    from mask2former.families import family_of

    family = family_of("facebook/mask2former-swin-tiny-coco-panoptic")  # reads config.json's model_type
    model = family.model_class.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
    processor = family.processor_class.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .modeling.configuration_mask2former import Mask2FormerConfig
from .modeling.configuration_video_mask2former import VideoMask2FormerConfig
from .modeling.modeling_mask2former import Mask2FormerForUniversalSegmentation
from .modeling.modeling_video_mask2former import (
    VideoMask2FormerForVideoSegmentation,
    VideoMask2FormerForVideoSegmentationOutput,
)
from .modeling.outputs import Mask2FormerForUniversalSegmentationOutput
from .processing.image_processing_mask2former import Mask2FormerImageProcessor
from .processing.tasks import TASKS, VIDEO_TASKS
from .processing.video_processing_mask2former import VideoMask2FormerVideoProcessor


@dataclass(frozen=True)
class ModelFamily:
    """What the trainer, the commands and export need to know about one model family.

    Args:
        model_type (`str`): the ``model_type`` of the family's ``config.json``.
        config_class (`type[PretrainedConfig]`): its config (``config_class(**model_config)``, ``from_pretrained``).
        model_class (`type[PreTrainedModel]`): the model trained and run for inference; its forward takes
            ``pixel_values`` (+ ``pixel_mask``, and the labels when training) and returns an output with ``loss``.
        processor_class (`type`): its image processor; it offers ``post_process_<task>_segmentation`` for each task.
        tasks (`tuple[str, ...]`): the tasks of :data:`mask2former.processing.tasks.TASKS` the family does.
        output_class (`type`): the model's output type (what the ONNX runner returns, so post-processing accepts it).
        export_outputs (`tuple[str, ...]`): the output fields the exported inference graph returns, in order.
        transformers_class (`type`, *optional*): transformers' class that loads the same checkpoints, if any (the
            demo checks that stock transformers loads what we save).
        backbone_prefix (`str`): where the backbone's parameters start in the model's state dict (the optimizer
            gives them the recipe's ``backbone_lr_multiplier``; pretrained backbone weights are loaded there).
    """

    model_type: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type
    tasks: tuple[str, ...]
    output_class: type
    export_outputs: tuple[str, ...] = ("class_queries_logits", "masks_queries_logits")
    transformers_class: type | None = None
    backbone_prefix: str = "model.pixel_level_module.encoder."


FAMILIES: dict[str, ModelFamily] = {
    "mask2former": ModelFamily(
        model_type="mask2former",
        config_class=Mask2FormerConfig,
        model_class=Mask2FormerForUniversalSegmentation,
        processor_class=Mask2FormerImageProcessor,
        tasks=TASKS,
        output_class=Mask2FormerForUniversalSegmentationOutput,
        transformers_class=transformers.Mask2FormerForUniversalSegmentation,
    ),
    # clips (pixel_values_videos (B, T, 3, H, W)) in, one class and one mask tube per query out
    "video_mask2former": ModelFamily(
        model_type="video_mask2former",
        config_class=VideoMask2FormerConfig,
        model_class=VideoMask2FormerForVideoSegmentation,
        processor_class=VideoMask2FormerVideoProcessor,
        tasks=VIDEO_TASKS,
        output_class=VideoMask2FormerForVideoSegmentationOutput,
    ),
}

DEFAULT_MODEL_TYPE = "mask2former"  # a recipe's model_config without a model_type describes a Mask2Former


def family_for(model_type: str) -> ModelFamily:
    """The family of ``model_type``; a ``ValueError`` naming it and the known ones otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"model_type {model_type!r} is not a model family of mask2former; known: {', '.join(sorted(FAMILIES))}"
        )
    return family


def family_of(config: str | os.PathLike | PretrainedConfig | Mapping[str, Any]) -> ModelFamily:
    """The family of a config: a config object, a ``config.json`` dict, or a model folder / Hub id (its config.json).

    Raises:
        ValueError: the config has no ``model_type`` or one that no family has.
        OSError: a folder without ``config.json``, or a Hub id that cannot be fetched.
    """
    if isinstance(config, PretrainedConfig):
        return family_for(config.model_type)
    if isinstance(config, Mapping):
        if "model_type" not in config:
            raise ValueError(f"the config has no model_type; give one of {', '.join(sorted(FAMILIES))}")
        return family_for(str(config["model_type"]))
    config_dict, _ = PretrainedConfig.get_config_dict(os.fspath(config))
    if "model_type" not in config_dict:
        raise ValueError(f"{os.fspath(config)}: config.json has no model_type; known: {', '.join(sorted(FAMILIES))}")
    return family_for(str(config_dict["model_type"]))
