"""Semantic, instance and panoptic post-processing of Mask2Former outputs, vectorised over queries.

The model predicts, per image, ``Q`` queries with class logits ``(Q, K+1)`` (the last class is "no object") and mask
logits ``(Q, h, w)`` at a quarter of the padded input resolution. The three tasks share these steps:

1. crop each image's valid (unpadded) region of the mask logits, in the logits' own coordinates;
2. select the queries worth keeping while still at low resolution;
3. decide, for every pixel of the target resolution, which query (or class) wins the bilinearly upsampled scores.

Step 3 is where the time goes. Bilinear interpolation (``align_corners=False``) makes every target pixel a convex
combination of the 2x2 low-resolution samples around it, so each 2x2 "cell" bounds the values of all target pixels
that read from it. Wherever these bounds already settle the decision (one query wins by a margin, every threshold
test is unanimous) the whole cell is decided at once; only the pixels of the remaining cells, along boundaries, are
interpolated exactly. The result is the same as upsampling every mask to the target size and deciding per pixel,
without materialising ``(N, H, W)`` score maps. :func:`upsample_bilinear` gives the dense equivalent on the same
sampling grid (used for binary maps and as the test oracle).

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

from ..utils.optional import require

# Chunk of masks upsampled at once for binary maps and RLE, to bound memory at (chunk, H, W).
_DENSE_CHUNK = 16


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


# --------------------------------------------------------------------------------------------------------------------
# Bilinear sampling grid (align_corners=False, as F.interpolate)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BilinearGrid:
    """For each target row (column): the first source row (column) it reads and the weight of the next one.

    `source_rows (H,)`, `row_weights (H,)`, `source_cols (W,)`, `col_weights (W,)`, `source_size (h, w)`, and
    `cell_pixels (h, w)`: how many target pixels read the 2x2 cell whose top-left sample is `(i, j)`.
    """

    source_rows: torch.Tensor
    row_weights: torch.Tensor
    source_cols: torch.Tensor
    col_weights: torch.Tensor
    source_size: tuple[int, int]
    cell_pixels: torch.Tensor

    @property
    def target_size(self) -> tuple[int, int]:
        return (self.source_rows.numel(), self.source_cols.numel())


def _axis(source_length: int, extent: float, target_length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    # F.interpolate's source coordinate for an output pixel centre, with the scale taken from the valid extent
    # (which may end inside the last cropped row), clamped to the cropped samples.
    scale = extent / target_length
    coordinate = ((torch.arange(target_length, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    index = coordinate.floor().long().clamp(max=source_length - 1)
    weight = (coordinate - index).clamp(0, 1)
    return index, weight


def bilinear_grid(
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    extent: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
) -> BilinearGrid:
    """The sampling grid of a bilinear resize of `source_size` (whose valid part is `extent`) to `target_size`."""
    extent = extent or source_size
    rows, row_weights = _axis(source_size[0], extent[0], target_size[0], device)
    cols, col_weights = _axis(source_size[1], extent[1], target_size[1], device)
    # (h,) x (w,) -> (h, w) target pixels per cell
    row_counts = torch.bincount(rows, minlength=source_size[0]).float()
    col_counts = torch.bincount(cols, minlength=source_size[1]).float()
    return BilinearGrid(rows, row_weights, cols, col_weights, tuple(source_size), row_counts[:, None] * col_counts)


def upsample_bilinear(maps: torch.Tensor, grid: BilinearGrid) -> torch.Tensor:
    """Dense bilinear resize on `grid`: `(N, h, w) -> (N, H, W)`; equals F.interpolate when the extent is whole."""
    height, width = grid.source_size
    next_cols = (grid.source_cols + 1).clamp(max=width - 1)
    next_rows = (grid.source_rows + 1).clamp(max=height - 1)
    # (N, h, w) -> (N, h, W): along the columns first, then along the rows, as PyTorch's kernel
    columns = (
        maps.index_select(2, grid.source_cols) * (1 - grid.col_weights)
        + maps.index_select(2, next_cols) * grid.col_weights
    )
    # (N, h, W) -> (N, H, W)
    return (
        columns.index_select(1, grid.source_rows) * (1 - grid.row_weights)[:, None]
        + columns.index_select(1, next_rows) * grid.row_weights[:, None]
    )


def sample_bilinear(maps: torch.Tensor, grid: BilinearGrid, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Values of the bilinear resize of `maps (N, h, w)` at target pixels `(rows, cols)` `(M,)`: `-> (N, M)`."""
    height, width = grid.source_size
    top, row_weight = grid.source_rows[rows], grid.row_weights[rows]
    left, col_weight = grid.source_cols[cols], grid.col_weights[cols]
    bottom, right = (top + 1).clamp(max=height - 1), (left + 1).clamp(max=width - 1)
    flat = maps.flatten(1)  # (N, h, w) -> (N, h*w)

    def corner(row_index: torch.Tensor, col_index: torch.Tensor) -> torch.Tensor:
        return flat.index_select(1, row_index * width + col_index)  # (N, h*w) -> (N, M)

    upper = torch.lerp(corner(top, left), corner(top, right), col_weight)
    lower = torch.lerp(corner(bottom, left), corner(bottom, right), col_weight)
    return torch.lerp(upper, lower, row_weight)


def expand_cells(cell_values: torch.Tensor, grid: BilinearGrid) -> torch.Tensor:
    """Gives every target pixel the value of the cell it reads: `(h, w) -> (H, W)`."""
    return cell_values.index_select(0, grid.source_rows).index_select(1, grid.source_cols)


def _cell_bounds(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Min and max over each 2x2 cell; the last row/column repeats, as the sampling clamps there.
    next_rows = torch.cat([maps[:, 1:], maps[:, -1:]], 1)  # (N, h, w): row i+1, clamped
    row_max, row_min = torch.maximum(maps, next_rows), torch.minimum(maps, next_rows)

    def with_next_col(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values[:, :, 1:], values[:, :, -1:]], 2)

    upper = torch.maximum(row_max, with_next_col(row_max))
    lower = torch.minimum(row_min, with_next_col(row_min))
    return lower, upper


# --------------------------------------------------------------------------------------------------------------------
# The shared decision: which map wins each upsampled pixel
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class UpsampledDecision:
    """The per-pixel winner among `N` upsampled maps, kept per cell where the cell is unanimous.

    `winner_cell (h, w)` and `covered_cell (h, w)` hold for the target pixels of cells where `certain (h, w)`; the
    other pixels, `(rows, cols)` `(M,)`, carry their exact `winner_pixel (M,)` and `covered_pixel (M,)`.
    `covered` means the winner's own logit passes the mask threshold. `covered_area (N,)`: target pixels where each
    map passes the threshold, whether it wins or not.
    """

    grid: BilinearGrid
    certain: torch.Tensor
    winner_cell: torch.Tensor
    covered_cell: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    winner_pixel: torch.Tensor
    covered_pixel: torch.Tensor
    covered_area: torch.Tensor | None

    def areas(self, num_maps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(N,)` target pixels won by each map, and won and covered."""
        weights = (self.grid.cell_pixels * self.certain).flatten().double()
        winners = self.winner_cell.flatten()
        won = torch.bincount(winners, weights=weights, minlength=num_maps)
        won = won + torch.bincount(self.winner_pixel, minlength=num_maps)
        covered_weights = weights * self.covered_cell.flatten()
        won_covered = torch.bincount(winners, weights=covered_weights, minlength=num_maps)
        won_covered = won_covered + torch.bincount(self.winner_pixel[self.covered_pixel], minlength=num_maps)
        return won.round().long(), won_covered.round().long()

    def render(self, lookup: torch.Tensor, fill: int) -> torch.Tensor:
        """`(H, W)` map of `lookup[winner]` where covered, `fill` elsewhere; `lookup (N,)`."""
        cell_values = torch.where(self.covered_cell, lookup[self.winner_cell], fill)
        segmentation = expand_cells(cell_values, self.grid)
        segmentation[self.rows, self.cols] = torch.where(self.covered_pixel, lookup[self.winner_pixel], fill)
        return segmentation


def decide_upsampled(
    maps: torch.Tensor,
    grid: BilinearGrid,
    weights: torch.Tensor | None = None,
    logit_threshold: float | None = None,
    class_weights: torch.Tensor | None = None,
) -> UpsampledDecision:
    """Argmax over `maps (N, h, w)` upsampled on `grid`: of the values themselves, or with `weights (N,)` of
    `weights x sigmoid(value)` (mask logits weighted by query scores), or with `class_weights (N, K)` over the `K`
    mixtures `sum_n class_weights[n, k] x sigmoid(value_n)` (semantic inference; winners are then classes).

    With `logit_threshold`, also whether the winner passes it and each map's area above it. Equal to upsampling the
    maps densely and deciding per pixel, up to float rounding at exact ties.
    """
    num_maps = maps.shape[0]

    def transform(values: torch.Tensor) -> torch.Tensor:
        # Increasing in each value, so bounds on the values bound the transformed scores.
        if class_weights is not None:
            # (N, ...) -> (K, ...); non-negative weights keep it increasing in each value
            return torch.einsum("nk,n...->k...", class_weights, values.sigmoid())
        if weights is None:
            return values
        return weights.view(-1, *[1] * (values.ndim - 1)) * values.sigmoid()

    lower, upper = _cell_bounds(maps)  # (N, h, w) each
    # Every target pixel of a cell interpolates its 2x2 samples, so its value lies in [lower, upper].
    best_lower, winner_cell = transform(lower).max(0)  # (N, h, w) -> (h, w)
    if (class_weights.shape[1] if class_weights is not None else num_maps) > 1:
        top_upper = transform(upper).topk(2, dim=0)  # (2, h, w)
        rival = torch.where(top_upper.indices[0] == winner_cell, top_upper.values[1], top_upper.values[0])
        certain = best_lower > rival
    else:
        certain = torch.ones_like(winner_cell, dtype=torch.bool)
    if logit_threshold is not None:
        inside, outside = lower >= logit_threshold, upper < logit_threshold  # (N, h, w)
        certain &= (inside | outside).all(0)
        covered_cell = inside.gather(0, winner_cell[None])[0]
    else:
        covered_cell = torch.ones_like(certain)

    rows, cols = expand_cells(~certain, grid).nonzero(as_tuple=True)  # (M,), (M,)
    values = sample_bilinear(maps, grid, rows, cols)  # (N, M)
    winner_pixel = transform(values).argmax(0) if rows.numel() else rows
    covered_area = None
    if logit_threshold is not None:
        covered_pixel = values.gather(0, winner_pixel[None])[0] >= logit_threshold
        certain_pixels = (grid.cell_pixels * certain).flatten()  # (h*w,)
        covered_area = (inside.flatten(1).float() @ certain_pixels).round().long()  # (N, h*w) @ (h*w,) -> (N,)
        covered_area = covered_area + (values >= logit_threshold).sum(1)
    else:
        covered_pixel = torch.ones_like(rows, dtype=torch.bool)
    return UpsampledDecision(
        grid, certain, winner_cell, covered_cell, rows, cols, winner_pixel, covered_pixel, covered_area
    )


def _probability_to_logit(probability: float) -> float:
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability / (1 - probability))


def _segments_that_pass(
    decision: UpsampledDecision, num_maps: int, overlap_mask_area_threshold: float, require_visible: bool
) -> torch.Tensor:
    # The paper's filter: keep a mask if the part of it that wins is a large enough share of its own area.
    won, won_covered = decision.areas(num_maps)
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
        decision = decide_upsampled(cropped, grid, class_weights=class_probs[index])
        labels = torch.arange(class_probs.shape[-1], device=cropped.device)
        segmentation = decision.render(labels, fill=0)
        if return_segmentation_scores:
            # Dense (K, H, W) scores, as asked: upsampled mask probabilities mixed by class probabilities.
            scores = torch.einsum("qk,qhw->khw", class_probs[index], upsample_bilinear(cropped, grid).sigmoid_())
            results.append({"segmentation": segmentation, "segmentation_scores": scores})
        else:
            results.append(segmentation)
    return results


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
        passed = _segments_that_pass(decision, kept.numel(), overlap_mask_area_threshold, require_visible=True)
        segment_ids, first_of_segment = _fused_segment_ids(kept_labels, passed, label_ids_to_fuse)  # (N,), (N,)
        segmentation = decision.render(segment_ids, fill=0).int()
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
        passed = _segments_that_pass(decision, kept.numel(), overlap_mask_area_threshold, require_visible=False)
        instance_ids = torch.full_like(kept, -1)
        instance_ids[passed] = torch.arange(int(passed.sum()), device=kept.device)
        segments_info = [
            {"id": instance_id, "label_id": label, "was_fused": False, "score": round(score, 6)}
            for instance_id, label, score in zip(
                range(int(passed.sum())), top_labels[index, kept[passed]].tolist(), kept_scores[passed].tolist()
            )
        ]
        if return_binary_maps or return_coco_annotation:
            # Full masks, overlaps included, upsampled a few at a time.
            passed_logits = kept_logits[passed]
            chunks = [
                upsample_bilinear(passed_logits[start : start + _DENSE_CHUNK], grid) >= logit_threshold
                for start in range(0, passed_logits.shape[0], _DENSE_CHUNK)
            ]
            if return_coco_annotation:
                segmentation = [rle for chunk in chunks for rle in _encode_rle(mask_utils, chunk)]
            else:
                segmentation = (
                    torch.cat(chunks)
                    if chunks
                    else torch.zeros(0, *grid.target_size, dtype=torch.bool, device=kept_logits.device)
                )
        else:
            segmentation = decision.render(instance_ids, fill=-1).int()
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


def _encode_rle(mask_utils: Any, masks: torch.Tensor) -> list[dict[str, Any]]:
    # pycocotools wants Fortran-ordered uint8 (H, W, N).
    array = masks.permute(1, 2, 0).cpu().numpy().astype("uint8", order="F")  # (N, H, W) -> (H, W, N)
    encoded = mask_utils.encode(array)
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable, as COCO result files store it
    return encoded
