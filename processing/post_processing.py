"""Semantic, instance and panoptic post-processing of Mask2Former outputs, vectorised over queries.

The model predicts, per image, ``Q`` queries with class logits ``(Q, K+1)`` (the last class is "no object") and mask
logits ``(Q, h, w)`` at a quarter of the padded input resolution. The three tasks share these steps:

1. crop each image's valid (unpadded) region of the mask logits, in the logits' own coordinates;
2. select the queries worth keeping while still at low resolution;
3. decide, for every pixel of the target resolution, which query (or class) wins the bilinearly upsampled scores.

Step 3 is `decision.decide_upsampled`: decided per 2x2 cell of low-resolution samples where the cell's bounds
settle it, exactly per pixel elsewhere, in tiles of bounded memory; the result is that of upsampling every mask to
the target size and deciding per pixel, without materialising ``(N, H, W)`` score maps.

Conventions (transformers' output formats):

- semantic: one ``(H, W)`` long tensor of class ids per image;
- panoptic: ``{"segmentation": (H, W) int32 (0 = no segment, ids from 1), "segments_info": [{"id", "label_id",
  "was_fused", "score"}]}``;
- instance: ``{"segmentation": (H, W) int32 (-1 = background, ids from 0), "segments_info": [...]}``, or binary maps
  ``(N, H, W)`` / COCO RLE dicts instead of the map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

from ..utils.optional import require
from . import upsampling
from .decision import UpsampledDecision, decide_upsampled
from .upsampling import (  # noqa: F401 (re-exported: the building blocks other families' post-processing uses)
    BilinearGrid,
    bilinear_grid,
    first_argmax,
    row_tiles,
    sample_bilinear,
    upsample_bilinear,
    upsample_rows,
)

# Bytes of the uint8 masks handed to pycocotools at once (a few full-size masks), bounding RLE encoding's memory.
_RLE_BYTES = 1 << 27


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def get_logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads `class_queries_logits (B, Q, K+1)` and `masks_queries_logits (B, Q, h, w)` from model outputs.

    Accepts a `ModelOutput`, a dict or any object with these attributes; returns float32 tensors.
    """
    tensors = []
    for name in ("class_queries_logits", "masks_queries_logits"):
        value = outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
        if value is None:
            raise ValueError(
                f"`outputs` has no `{name}`; pass the output of Mask2FormerForUniversalSegmentation (or an object "
                "with `class_queries_logits` (B, Q, K+1) and `masks_queries_logits` (B, Q, H/4, W/4))."
            )
        tensors.append(value)
    class_logits, mask_logits = tensors
    if class_logits.ndim != 3 or mask_logits.ndim != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            "expected `class_queries_logits` (B, Q, K+1) and `masks_queries_logits` (B, Q, h, w) with the same B and "
            f"Q, got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}."
        )
    return class_logits.float(), mask_logits.float()


def _check_sizes(name: str, sizes: Any, batch_size: int) -> list[tuple[int, int]] | None:
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    sizes = [tuple(int(v) for v in size) for size in sizes]
    if len(sizes) != batch_size:
        raise ValueError(
            f"`{name}` has {len(sizes)} entries but the outputs hold {batch_size} images; pass one (height, width) "
            "per image."
        )
    for size in sizes:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"every entry of `{name}` must be a positive (height, width), got {size}.")
    return sizes


@dataclass
class ImageGeometry:
    """Where an image lies in the mask logits and the size its result is wanted at.

    Args:
        crop_size: `(rows, cols)` of the mask logits to keep (the valid region, rounded up).
        extent: the valid region's exact `(height, width)` in mask-logit pixels (may be fractional).
        target_size: `(height, width)` of the result.
    """

    crop_size: tuple[int, int]
    extent: tuple[float, float]
    target_size: tuple[int, int]


def resolve_geometry(
    mask_logits_size: tuple[int, int],
    batch_size: int,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    valid_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    input_size: tuple[int, int] | None = None,
) -> list[ImageGeometry]:
    """Per image: the valid region of the mask logits and the output size.

    Args:
        mask_logits_size: `(h, w)` of `masks_queries_logits`.
        batch_size: number of images.
        target_sizes: `(height, width)` per image of the result; default the valid size in input pixels.
        valid_sizes: `(height, width)` per image of the unpadded region in model-input pixels; default the whole
            input.
        input_size: `(height, width)` of the padded model input; default 4x the mask logits (their stride).
    """
    mask_height, mask_width = mask_logits_size
    if input_size is None:
        input_size = (4 * mask_height, 4 * mask_width)
    target_sizes = _check_sizes("target_sizes", target_sizes, batch_size)
    valid_sizes = _check_sizes("valid_sizes", valid_sizes, batch_size) or [tuple(input_size)] * batch_size
    geometries = []
    for index, (valid_height, valid_width) in enumerate(valid_sizes):
        valid_height, valid_width = min(valid_height, input_size[0]), min(valid_width, input_size[1])
        extent = (valid_height * mask_height / input_size[0], valid_width * mask_width / input_size[1])
        # Round up, tolerating float noise, so that a fractional last row is still read.
        crop = (min(mask_height, math.ceil(extent[0] - 1e-6)), min(mask_width, math.ceil(extent[1] - 1e-6)))
        target = target_sizes[index] if target_sizes is not None else (valid_height, valid_width)
        geometries.append(ImageGeometry(crop_size=crop, extent=extent, target_size=target))
    return geometries


def _probability_to_logit(probability: float) -> float:
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability / (1 - probability))


def _segments_that_pass(
    decision: UpsampledDecision, overlap_mask_area_threshold: float, require_visible: bool
) -> torch.Tensor:
    # The paper's filter: keep a mask if the part of it that wins is a large enough share of its own area.
    won, won_covered = decision.areas()
    own_area = decision.covered_area
    passed = (own_area > 0) & (won >= overlap_mask_area_threshold * own_area)
    if require_visible:
        passed &= (won > 0) & (won_covered > 0)
    return passed  # (N,)


def _crop(mask_logits: torch.Tensor, geometry: ImageGeometry) -> torch.Tensor:
    return mask_logits[..., : geometry.crop_size[0], : geometry.crop_size[1]]


def _grid_for(mask_logits: torch.Tensor, geometry: ImageGeometry) -> BilinearGrid:
    return bilinear_grid(geometry.crop_size, geometry.target_size, geometry.extent, device=mask_logits.device)


# --------------------------------------------------------------------------------------------------------------------
# The three tasks
# --------------------------------------------------------------------------------------------------------------------


def post_process_semantic_segmentation(
    outputs: Any, geometries: list[ImageGeometry], return_segmentation_scores: bool = False
) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Semantic maps: argmax over classes of sum over queries of softmax(class) x sigmoid(mask).

    As in the paper's code, the mask logits are upsampled bilinearly before the sigmoid (decided per cell where
    possible, see `decide_upsampled`).

    Returns:
        Per image a `(H, W)` long tensor of class ids, or with `return_segmentation_scores` a dict with
        `segmentation` and `segmentation_scores (K, H, W)`.
    """
    class_logits, mask_logits = get_logits(outputs)
    class_probs = class_logits.softmax(-1)[..., :-1]  # (B, Q, K+1) -> (B, Q, K)
    results = []
    for index, geometry in enumerate(geometries):
        cropped = _crop(mask_logits[index], geometry)  # (Q, h, w)
        grid = _grid_for(mask_logits, geometry)
        if return_segmentation_scores:
            results.append(_semantic_scores(cropped, grid, class_probs[index]))
            continue
        decision = decide_upsampled(cropped, grid, class_weights=class_probs[index])
        results.append(decision.render(torch.arange(class_probs.shape[-1], device=cropped.device), fill=0))
    return results


def _semantic_scores(mask_logits: torch.Tensor, grid: BilinearGrid, class_probs: torch.Tensor) -> dict[str, Any]:
    """Dense `(K, H, W)` class scores, as asked, and their argmax, computed a band of rows at a time."""
    num_queries, num_classes = class_probs.shape
    height, width = grid.target_size
    scores = mask_logits.new_empty(num_classes, height, width)
    segmentation = torch.empty(height, width, dtype=torch.long, device=mask_logits.device)
    for start, stop in row_tiles(grid, num_queries + num_classes):
        probabilities = upsample_rows(mask_logits, grid, start, stop).flatten(1).sigmoid_()  # (Q, rows*W)
        band = class_probs.T @ probabilities  # (K, Q) @ (Q, rows*W) -> (K, rows*W)
        scores[:, start:stop] = band.view(num_classes, stop - start, width)
        segmentation[start:stop] = first_argmax(band).view(stop - start, width)
    return SemanticSegmentationPostProcessorOutput(data={"segmentation": segmentation, "segmentation_scores": scores})


def _fused_segment_ids(
    labels: torch.Tensor, passed: torch.Tensor, label_ids_to_fuse: set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id per kept query (`0` when it did not pass), numbered from 1 in query order, and whether the query
    is the first of its segment.

    Queries whose label is in `label_ids_to_fuse` share the id of the first query of that label.
    """
    num_maps = labels.shape[0]
    positions = torch.arange(num_maps, device=labels.device)
    fuse = torch.isin(labels, torch.tensor(sorted(label_ids_to_fuse), dtype=labels.dtype, device=labels.device))
    # One key per future segment: the label for fused classes, a unique negative number otherwise.
    keys = torch.where(fuse, labels, -1 - positions)[passed]
    segment_ids = torch.zeros(num_maps, dtype=torch.long, device=labels.device)
    is_first = torch.zeros(num_maps, dtype=torch.bool, device=labels.device)
    if keys.numel() == 0:
        return segment_ids, is_first
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    first_position = torch.full((unique_keys.numel(),), num_maps, device=labels.device, dtype=torch.long)
    first_position = first_position.scatter_reduce(0, inverse, positions[passed], reduce="amin")
    # Rank segments by the position of their first query: ids 1, 2, ... in query order.
    rank = torch.empty_like(first_position)
    rank[first_position.argsort()] = torch.arange(unique_keys.numel(), device=labels.device)
    segment_ids[passed] = rank[inverse] + 1
    is_first[passed] = first_position[inverse] == positions[passed]
    return segment_ids, is_first


def post_process_panoptic_segmentation(
    outputs: Any,
    geometries: list[ImageGeometry],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: set[int] | None = None,
    return_binary_maps: bool = False,
) -> list[dict[str, Any]]:
    """Panoptic segmentation, the paper's inference.

    Queries whose most likely class is a real class with probability above `threshold` compete for each pixel with
    score x mask probability; a pixel joins the winner if the winner's mask probability reaches `mask_threshold`; a
    query becomes a segment if it wins at least `overlap_mask_area_threshold` of its own mask area. Queries of a
    label in `label_ids_to_fuse` merge into one segment.

    Returns:
        Per image `{"segmentation": (H, W) int32, 0 where no segment, or (S, H, W) bool with return_binary_maps,
        "segments_info": [{"id", "label_id", "was_fused", "score"}]}`.
    """
    class_logits, mask_logits = get_logits(outputs)
    label_ids_to_fuse = set(label_ids_to_fuse or ())
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)  # (B, Q, K+1) -> (B, Q), (B, Q)
    keep = labels.ne(num_classes) & (scores > threshold)  # (B, Q)
    logit_threshold = _probability_to_logit(mask_threshold)
    results = []
    for index, geometry in enumerate(geometries):
        kept = keep[index].nonzero()[:, 0]  # (N,)
        kept_scores, kept_labels = scores[index, kept], labels[index, kept]
        kept_logits = _crop(mask_logits[index, kept], geometry)  # (N, h, w)
        if kept.numel() == 0:
            results.append(_empty_result(geometry, fill=0, binary=return_binary_maps, device=mask_logits.device))
            continue
        grid = _grid_for(mask_logits, geometry)
        decision = decide_upsampled(
            kept_logits,
            grid,
            kept_scores,
            logit_threshold,
        )
        passed = _segments_that_pass(decision, overlap_mask_area_threshold, require_visible=True)
        segment_ids, first_of_segment = _fused_segment_ids(kept_labels, passed, label_ids_to_fuse)  # (N,), (N,)
        segmentation = decision.render(segment_ids.int(), fill=0)
        # One entry per segment, from its first query (ids grow with query order).
        ids, label_list, score_list = (
            segment_ids[first_of_segment].tolist(),
            kept_labels[first_of_segment].tolist(),
            kept_scores[first_of_segment].tolist(),
        )
        segments_info = [
            {"id": segment_id, "label_id": label, "was_fused": label in label_ids_to_fuse, "score": round(score, 6)}
            for segment_id, label, score in zip(ids, label_list, score_list)
        ]
        if return_binary_maps:
            id_tensor = torch.tensor(ids, dtype=segmentation.dtype, device=segmentation.device)
            segmentation = segmentation[None] == id_tensor[:, None, None]  # (H, W) -> (S, H, W)
        results.append({"segmentation": segmentation, "segments_info": segments_info})
    return results


def post_process_instance_segmentation(
    outputs: Any,
    geometries: list[ImageGeometry],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
) -> list[dict[str, Any]]:
    """Instance segmentation, the paper's inference with thresholds.

    Top-`Q` (query, class) pairs by class probability; score = class probability x mean mask probability inside the
    mask (pixels with probability >= `mask_threshold`, measured at the mask resolution). Pairs scoring at least
    `threshold` are kept, ordered by score; in the segmentation map a pixel goes to the covering instance with the
    highest score x mask probability, and an instance is dropped unless it keeps `overlap_mask_area_threshold` of
    its area (set it to 0 to keep hidden instances in binary maps / RLE, as COCO evaluation wants).

    Returns:
        Per image `{"segmentation": ..., "segments_info": [{"id", "label_id", "was_fused": False, "score"}]}` where
        segmentation is an `(H, W)` int32 map (-1 = background), or with `return_binary_maps` a `(N, H, W)` bool
        tensor of each instance's full mask, or with `return_coco_annotation` a list of COCO RLE dicts (pycocotools).
    """
    if return_coco_annotation and return_binary_maps:
        raise ValueError("`return_coco_annotation` and `return_binary_maps` cannot both be True; choose one.")
    if return_coco_annotation:
        mask_utils = _pycocotools_mask()
    class_logits, mask_logits = get_logits(outputs)
    num_queries, num_classes_with_void = class_logits.shape[1:]
    num_classes = num_classes_with_void - 1
    class_probs = class_logits.softmax(-1)[..., :-1].flatten(1)  # (B, Q, K) -> (B, Q*K)
    top_probs, top_indices = class_probs.topk(min(num_queries, class_probs.shape[1]), dim=1)  # (B, T)
    top_queries, top_labels = top_indices // num_classes, top_indices % num_classes
    logit_threshold = _probability_to_logit(mask_threshold)
    results = []
    for index, geometry in enumerate(geometries):
        # score <= class probability: pairs below the threshold already are out, before touching any mask.
        hopeful = (top_probs[index] >= threshold).nonzero()[:, 0]  # (T',)
        # The mask score depends on the query only: compute it once per query in play.
        queries, query_of_pair = torch.unique(top_queries[index, hopeful], return_inverse=True)
        query_logits = _crop(mask_logits[index], geometry)[queries]  # (U, h, w)
        inside = (query_logits >= logit_threshold).flatten(1)  # (U, h*w)
        mask_scores = (query_logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)  # (U,)
        pair_scores = top_probs[index, hopeful] * mask_scores[query_of_pair]  # (T',)
        passing = (pair_scores >= threshold).nonzero()[:, 0]
        order = passing[pair_scores[passing].argsort(descending=True, stable=True)]  # (N,) best first
        kept = hopeful[order]
        candidate_logits, candidate_scores = query_logits[query_of_pair[order]], pair_scores[order]
        if kept.numel() == 0:
            empty = _empty_result(geometry, fill=-1, binary=return_binary_maps, device=mask_logits.device)
            if return_coco_annotation:
                empty["segmentation"] = []
            results.append(empty)
            continue
        kept_logits, kept_scores = candidate_logits, candidate_scores  # (N, h, w), (N,)
        grid = _grid_for(mask_logits, geometry)
        decision = decide_upsampled(
            kept_logits,
            grid,
            kept_scores,
            logit_threshold,
        )
        passed = _segments_that_pass(decision, overlap_mask_area_threshold, require_visible=False)
        instance_ids = torch.full_like(kept, -1)
        instance_ids[passed] = torch.arange(int(passed.sum()), device=kept.device)
        segments_info = [
            {"id": instance_id, "label_id": label, "was_fused": False, "score": round(score, 6)}
            for instance_id, label, score in zip(
                range(int(passed.sum())), top_labels[index, kept[passed]].tolist(), kept_scores[passed].tolist()
            )
        ]
        if return_coco_annotation:
            segmentation = _rle_of_upsampled(mask_utils, kept_logits[passed], grid, logit_threshold)
        elif return_binary_maps:
            segmentation = _binary_masks(kept_logits[passed], grid, logit_threshold)  # full masks, overlaps included
        else:
            segmentation = decision.render(instance_ids.int(), fill=-1)
        results.append({"segmentation": segmentation, "segments_info": segments_info})
    return results


def _empty_result(geometry: ImageGeometry, fill: int, binary: bool, device: torch.device) -> dict[str, Any]:
    if binary:
        return {
            "segmentation": torch.zeros(0, *geometry.target_size, dtype=torch.bool, device=device),
            "segments_info": [],
        }
    return {
        "segmentation": torch.full(geometry.target_size, fill, dtype=torch.int32, device=device),
        "segments_info": [],
    }


def _pycocotools_mask() -> Any:
    return require("pycocotools.mask", "`return_coco_annotation=True`")


def _binary_masks(mask_logits: torch.Tensor, grid: BilinearGrid, logit_threshold: float) -> torch.Tensor:
    """`(S, h, w)` mask logits -> `(S, H, W)` bool: upsampled logits at or above the threshold, a band at a time."""
    masks = torch.empty(mask_logits.shape[0], *grid.target_size, dtype=torch.bool, device=mask_logits.device)
    for start, stop in row_tiles(grid, mask_logits.shape[0], budget=upsampling.DENSE_ELEMENTS):
        masks[:, start:stop] = upsample_rows(mask_logits, grid, start, stop) >= logit_threshold
    return masks


def _rle_of_upsampled(
    mask_utils: Any, mask_logits: torch.Tensor, grid: BilinearGrid, logit_threshold: float
) -> list[dict[str, Any]]:
    """COCO RLE dicts of the thresholded upsampled masks, a few full-size masks at a time."""
    chunk = max(1, _RLE_BYTES // (grid.target_size[0] * grid.target_size[1]))
    encoded = []
    for first in range(0, mask_logits.shape[0], chunk):
        encoded.extend(
            _encode_rle(mask_utils, _binary_masks(mask_logits[first : first + chunk], grid, logit_threshold))
        )
    return encoded


def _encode_rle(mask_utils: Any, masks: torch.Tensor) -> list[dict[str, Any]]:
    """`(N, H, W)` bool masks -> N COCO RLE dicts with str counts."""
    # pycocotools wants Fortran-ordered uint8 (H, W, N).
    array = masks.permute(1, 2, 0).cpu().numpy().astype("uint8", order="F")  # (N, H, W) -> (H, W, N)
    encoded = mask_utils.encode(array)
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable, as COCO result files store it
    return encoded
