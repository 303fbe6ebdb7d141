"""Video instance post-processing: class logits `(B, Q, K+1)` and mask tubes `(B, Q, T, h, w)` -> video instances.

The original video Mask2Former's inference, per clip: the top-k (query, class) pairs over the softmax class
probabilities (no-object dropped), each pair's tube upsampled bilinearly to the original frame size and thresholded
at probability 0.5 (logit 0); a pair's score is its class probability. With ``use_mask_scores`` it is multiplied by
the tube's mean mask probability inside the mask, as the image model's instance inference does.

Like the image post-processing, each clip's valid (unpadded) region is cropped in the logits' own coordinates and
resized once (the original upsamples to the padded input, crops, and resizes again); the grid is
``post_processing.bilinear_grid``, so a frame's masks equal the image post-processing's binary maps of that frame.
"""

from __future__ import annotations

from typing import Any

import torch

from .post_processing import ImageGeometry, bilinear_grid, upsample_bilinear

# Tube frames upsampled at once, to bound memory at (chunk, H, W).
_FRAME_CHUNK = 16


def get_tube_logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads `class_queries_logits (B, Q, K+1)` and `masks_queries_logits (B, Q, T, h, w)` as float32."""
    tensors = []
    for name in ("class_queries_logits", "masks_queries_logits"):
        value = outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
        if value is None:
            raise ValueError(
                f"`outputs` has no `{name}`; pass the output of VideoMask2FormerForVideoSegmentation (or an object "
                "with `class_queries_logits` (B, Q, K+1) and `masks_queries_logits` (B, Q, T, H/4, W/4))."
            )
        tensors.append(value)
    class_logits, mask_logits = tensors
    if class_logits.ndim != 3 or mask_logits.ndim != 5 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            "expected `class_queries_logits` (B, Q, K+1) and mask tubes `masks_queries_logits` (B, Q, T, h, w) with "
            f"the same B and Q, got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}."
        )
    return class_logits.float(), mask_logits.float()


def post_process_video_instance_segmentation(
    outputs: Any,
    geometries: list[ImageGeometry],
    top_k: int = 10,
    mask_threshold: float = 0.5,
    use_mask_scores: bool = False,
    return_coco_annotation: bool = False,
) -> list[dict[str, Any]]:
    """Top-k (query, class) pairs per clip, with their tubes at the original size.

    Args:
        outputs: ``class_queries_logits`` `(B, Q, K+1)` and ``masks_queries_logits`` `(B, Q, T, h, w)`.
        geometries: per clip, where its frames lie in the mask logits and the size wanted (``resolve_geometry``).
        top_k: pairs kept per clip (at most Q * K).
        mask_threshold: probability a pixel needs to be in a mask.
        use_mask_scores: multiply the class probability by the mean mask probability inside the tube.
        return_coco_annotation: per-frame COCO RLE (pycocotools) instead of boolean masks.

    Returns:
        per clip `{"scores": (k,) float, "labels": (k,) long, "masks": (k, T, H, W) bool}`, best first; with
        ``return_coco_annotation`` `"segmentations"` (per instance, T RLE dicts) replaces ``masks``.
    """
    if not 0 < mask_threshold < 1:
        raise ValueError(f"mask_threshold must be a probability in (0, 1), got {mask_threshold}.")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    class_logits, mask_logits = get_tube_logits(outputs)
    if len(geometries) != class_logits.shape[0]:
        raise ValueError(f"got {len(geometries)} geometries for {class_logits.shape[0]} clips; pass one per clip.")
    if return_coco_annotation:
        from .post_processing import _encode_rle, _pycocotools_mask

        mask_utils = _pycocotools_mask()
    num_classes = class_logits.shape[-1] - 1
    logit_threshold = float(torch.logit(torch.tensor(mask_threshold, dtype=torch.float64)))
    # (B, Q, K+1) -> (B, Q*K): every (query, class) pair, no-object dropped
    pair_probabilities = class_logits.softmax(-1)[..., :-1].flatten(1)
    scores, pairs = pair_probabilities.topk(min(top_k, pair_probabilities.shape[1]), dim=1)  # (B, k)
    queries, labels = pairs // num_classes, pairs % num_classes

    results = []
    for index, geometry in enumerate(geometries):
        rows, cols = geometry.crop_size
        tubes = mask_logits[index, queries[index], :, :rows, :cols]  # (k, T, h', w')
        clip_scores = scores[index]
        if use_mask_scores:
            inside = tubes >= logit_threshold
            mean_probability = (tubes.sigmoid() * inside).flatten(1).sum(1) / (inside.flatten(1).sum(1) + 1e-6)
            clip_scores = clip_scores * mean_probability
        order = clip_scores.argsort(descending=True, stable=True)
        tubes, clip_scores, clip_labels = tubes[order], clip_scores[order], labels[index, order]
        grid = bilinear_grid(geometry.crop_size, geometry.target_size, geometry.extent, device=tubes.device)
        # (k, T, h', w') -> (k*T, h', w') -> (k*T, H, W), a few frames at a time
        frames = tubes.flatten(0, 1)
        masks = torch.cat(
            [
                upsample_bilinear(frames[start : start + _FRAME_CHUNK], grid) >= logit_threshold
                for start in range(0, frames.shape[0], _FRAME_CHUNK)
            ]
        ).view(*tubes.shape[:2], *grid.target_size)
        result: dict[str, Any] = {"scores": clip_scores, "labels": clip_labels}
        if return_coco_annotation:
            result["segmentations"] = [_encode_rle(mask_utils, instance) for instance in masks]
        else:
            result["masks"] = masks
        results.append(result)
    return results


__all__ = ["get_tube_logits", "post_process_video_instance_segmentation"]
