"""The segmentation tasks, named once for the whole package, and the one task -> post-processing dispatch.

Every part that takes a task (the data readers, the collator, the trainer, ``mask2former segment`` and
``mask2former evaluate``) imports ``TASKS`` from here, and :func:`check_task` gives one error message for a wrong one.
:func:`post_process` turns model outputs into the task's result with the thresholds of ``INFERENCE_DEFAULTS``; the
training evaluation, the demo and ``mask2former segment`` all call it, so they post-process alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

TASKS: tuple[str, ...] = ("panoptic", "instance", "semantic")
# the video families' tasks (clips in, instance tubes out)
VIDEO_TASKS: tuple[str, ...] = ("video-instance",)

# The paper's inference settings per task. Panoptic: a segment needs class score > 0.8 and keeps > 80% of its mask
# where it wins the pixel argmax. Instance: every query is kept, ranked by score (mask AP ranks them; a threshold only
# removes low-score true positives), with no overlap filter: instances may overlap.
INFERENCE_DEFAULTS: dict[str, dict[str, float]] = {
    "panoptic": {"threshold": 0.8, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8},
    "instance": {"threshold": 0.0, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.0},
    "semantic": {},
}
INSTANCE_FORMATS = ("rle", "binary_maps")


def check_task(task: str, tasks: tuple[str, ...] = TASKS) -> str:
    """Returns ``task`` if it is one of ``tasks``; raises a ``ValueError`` naming it and the choices otherwise."""
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(tasks)}")
    return task


def inference_settings(task: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """``INFERENCE_DEFAULTS[task]`` with ``overrides`` applied (keys the task does not use are left out).

    Raises:
        ValueError: an override that is no threshold of post-processing.
    """
    known = set(INFERENCE_DEFAULTS["panoptic"])
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"unknown inference settings {unknown}; use {sorted(known)}")
    defaults = INFERENCE_DEFAULTS[check_task(task)]
    return {**defaults, **{key: float(value) for key, value in (overrides or {}).items() if key in defaults}}


def post_process(
    processor: Any,
    outputs: Any,
    task: str,
    target_sizes: list[tuple[int, int]],
    *,
    pixel_mask: torch.Tensor | None = None,
    inference: dict[str, float] | None = None,
    label_ids_to_fuse: Iterable[int] | None = None,
    instance_format: str = "rle",
) -> list[Any]:
    """The processor's post-processing of ``task`` at the images' sizes.

    Args:
        processor: the image processor (``post_process_<task>_segmentation``).
        outputs: the model's output (``class_queries_logits (B, Q, K+1)``, ``masks_queries_logits (B, Q, h, w)``).
        task: ``"panoptic"``, ``"instance"`` or ``"semantic"``.
        target_sizes: ``(height, width)`` of each image's result.
        pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): the exact valid region of each padded image.
        inference: thresholds over ``INFERENCE_DEFAULTS[task]`` (``threshold``, ``mask_threshold``,
            ``overlap_mask_area_threshold``).
        label_ids_to_fuse: panoptic: labels merged into one segment per image (the stuff classes, as the paper's
            inference does).
        instance_format: instance: ``"rle"`` (COCO RLEs, what mask AP and result files take) or ``"binary_maps"``
            (``(N, H, W)`` masks, for drawing).

    Returns:
        `list`: per image, a ``(H, W)`` label map (semantic) or ``{"segmentation", "segments_info"}``.
    """
    settings = inference_settings(task, inference)
    if task == "semantic":
        return processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes, pixel_mask=pixel_mask)
    if task == "instance":
        if instance_format not in INSTANCE_FORMATS:
            raise ValueError(f"instance_format {instance_format!r} must be one of {INSTANCE_FORMATS}")
        return processor.post_process_instance_segmentation(
            outputs,
            **settings,
            return_coco_annotation=instance_format == "rle",
            return_binary_maps=instance_format == "binary_maps",
            target_sizes=target_sizes,
            pixel_mask=pixel_mask,
        )
    return processor.post_process_panoptic_segmentation(
        outputs,
        **settings,
        label_ids_to_fuse=set(label_ids_to_fuse) if label_ids_to_fuse is not None else None,
        target_sizes=target_sizes,
        pixel_mask=pixel_mask,
    )
