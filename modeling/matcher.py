"""Hungarian matching between the queries' predictions and the ground-truth segments of each image.

The matching cost of query `q` and target `t` is

    class_cost * (-p_q[class_t]) + mask_cost * BCE(mask_q, mask_t) + dice_cost * dice(mask_q, mask_t)

where both mask terms are computed on the same `num_points` uniformly random points for all predictions and targets of
an image (Mask2Former, Section 3.3). Mask tubes of a clip (video Mask2Former) are read at the same points in every
frame and costed over all of them. All costs of a batch are computed at once in float32 with autocast disabled; only
the assignment itself (`scipy.optimize.linear_sum_assignment`, a CPU algorithm) runs once per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .point_sampling import point_sample, sample_uniform_points

# Costs are clamped into [-MAX_COST, MAX_COST] and NaN becomes MAX_COST, so the solver always sees a finite matrix
# (an inf or NaN entry makes scipy raise "cost matrix is infeasible"). A pair with an invalid cost is matched only when
# nothing else is left. Real costs are far smaller: class <= 1, dice <= 1, BCE ~ |logit|.
MAX_COST = 1e8


def validate_targets(
    mask_labels: list[torch.Tensor],
    class_labels: list[torch.Tensor],
    batch_size: int,
    num_queries: int,
    num_labels: int,
    mask_dims: int = 3,
) -> None:
    """
    Check the targets of a batch and raise a `ValueError` that names the problem and the fix.

    Args:
        mask_labels (`list[torch.Tensor]`): per image, binary masks of shape `(num_targets, height, width)` (or per
            clip, mask tubes `(num_targets, num_frames, height, width)`).
        class_labels (`list[torch.Tensor]`): per image, class ids of shape `(num_targets,)`.
        batch_size (`int`): number of images predicted.
        num_queries (`int`): number of queries per image; no image may have more targets.
        num_labels (`int`): number of classes `K`; ids must lie in `0..K-1` (`K` is the no-object class).
        mask_dims (`int`, defaults to 3): dimensions of each mask tensor, 4 for tubes.
    """
    if len(mask_labels) != batch_size or len(class_labels) != batch_size:
        raise ValueError(
            f"Expected one entry per image in mask_labels and class_labels ({batch_size} images), "
            f"got {len(mask_labels)} mask tensors and {len(class_labels)} label tensors."
        )
    for image_index, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
        if classes.dim() != 1 or classes.is_floating_point():
            raise ValueError(
                f"class_labels[{image_index}] must be a 1-D integer tensor, got shape {tuple(classes.shape)} "
                f"and dtype {classes.dtype}."
            )
        if masks.dim() != mask_dims or masks.shape[0] != classes.shape[0]:
            layout = "(num_targets, height, width)" if mask_dims == 3 else "(num_targets, num_frames, height, width)"
            raise ValueError(
                f"mask_labels[{image_index}] must have shape {layout} with num_targets = "
                f"len(class_labels[{image_index}]) = {classes.shape[0]}, got shape {tuple(masks.shape)}."
            )
        if classes.shape[0] > num_queries:
            raise ValueError(
                f"Image {image_index} has {classes.shape[0]} target segments but the model has only {num_queries} "
                "queries, so some segments could never be matched. Increase config.num_queries or drop segments "
                "(e.g. the smallest) in the data pipeline."
            )
    all_classes = torch.cat([classes.reshape(-1) for classes in class_labels])
    if all_classes.numel() == 0:
        return
    # One device->host sync for the whole batch; the offending id is looked up only on failure.
    smallest, largest = torch.stack([all_classes.min(), all_classes.max()]).tolist()
    if smallest >= 0 and largest < num_labels:
        return
    for image_index, classes in enumerate(class_labels):
        bad = classes[(classes < 0) | (classes >= num_labels)]
        if bad.numel() > 0:
            raise ValueError(
                f"class_labels[{image_index}] contains class id {int(bad[0])}, outside 0..{num_labels - 1} "
                f"(num_labels={num_labels}; id {num_labels} is the no-object class and is never a target). "
                "Remap the ids to contiguous 0..num_labels-1, or drop ignored segments (e.g. 255) before the loss."
            )


def target_point_coordinates(
    point_coordinates: torch.Tensor, target_size: tuple[int, int], canvas_size: tuple[int, int]
) -> torch.Tensor:
    """
    Express points given on the batch canvas in the frame of a smaller (unpadded) target mask.

    Reading a `(h, w)` mask at the rescaled points with zero padding outside equals reading the mask zero-padded at
    the bottom/right to the `(H, W)` canvas, without building the padded copy.

    Args:
        point_coordinates (`torch.Tensor` of shape `(..., 2)`): `(x, y)` in `[0, 1]` relative to the canvas.
        target_size (`tuple[int, int]`): `(h, w)` of the target masks.
        canvas_size (`tuple[int, int]`): `(H, W)` of the largest target in the batch.
    """
    if tuple(target_size) == tuple(canvas_size):
        return point_coordinates
    scale = point_coordinates.new_tensor([canvas_size[1] / target_size[1], canvas_size[0] / target_size[0]])
    return point_coordinates * scale


def canvas_size_of(mask_labels: list[torch.Tensor]) -> tuple[int, int]:
    """`(H, W)`: the largest height and width over the batch's target masks (their common padded canvas)."""
    return max(masks.shape[-2] for masks in mask_labels), max(masks.shape[-1] for masks in mask_labels)


def pairwise_sigmoid_cross_entropy(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """
    Mean binary cross-entropy of every prediction against every target, on shared points.

    Args:
        point_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_points)`): predicted logits.
        point_targets (`torch.Tensor` of shape `(batch_size, num_targets, num_points)`): targets in `[0, 1]`.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_queries, num_targets)`.
    """
    num_points = point_logits.shape[-1]
    # BCE(x, 1) = softplus(-x) and BCE(x, 0) = softplus(x); since the target is linear in BCE, the pairwise sum over
    # points is two matrix products.
    positive_cost = F.softplus(-point_logits) / num_points  # (B, Q, P)
    negative_cost = F.softplus(point_logits) / num_points  # (B, Q, P)
    # (B, Q, P) @ (B, P, T) -> (B, Q, T)
    return positive_cost @ point_targets.transpose(1, 2) + negative_cost @ (1 - point_targets).transpose(1, 2)


def pairwise_dice(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """
    Dice loss `1 - (2|p t| + 1) / (|p| + |t| + 1)` of every prediction against every target, on shared points.

    Args:
        point_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_points)`): predicted logits.
        point_targets (`torch.Tensor` of shape `(batch_size, num_targets, num_points)`): targets in `[0, 1]`.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_queries, num_targets)`.
    """
    probabilities = point_logits.sigmoid()
    # (B, Q, P) @ (B, P, T) -> (B, Q, T)
    numerator = 2 * probabilities @ point_targets.transpose(1, 2)
    # (B, Q, 1) + (B, 1, T) -> (B, Q, T)
    denominator = probabilities.sum(-1).unsqueeze(2) + point_targets.sum(-1).unsqueeze(1)
    return 1 - (numerator + 1) / (denominator + 1)


class Mask2FormerHungarianMatcher(nn.Module):
    """
    One-to-one assignment of predictions (queries) to ground-truth segments, per image.

    Unmatched queries are trained towards the no-object class. Each image needs at most `num_queries` targets.

    Args:
        cost_class (`float`, *optional*, defaults to 2.0):
            Weight of the classification cost `-p(target class)`. The paper uses 2.0 (= `config.class_weight`);
            older transformers releases hard-coded 1.0.
        cost_mask (`float`, *optional*, defaults to 5.0): weight of the sigmoid binary cross-entropy mask cost.
        cost_dice (`float`, *optional*, defaults to 5.0): weight of the dice mask cost.
        num_points (`int`, *optional*, defaults to 12544):
            Number of uniformly random points per image on which the mask costs are computed; the same points are
            used for every prediction and every target of that image.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("At least one of cost_class, cost_mask and cost_dice must be non-zero.")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrices(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
    ) -> torch.Tensor:
        """
        Matching costs of all queries against all targets, for the whole batch.

        Args:
            masks_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, height, width)`): mask logits
                (or mask tubes `(batch_size, num_queries, num_frames, height, width)`, with targets to match).
            class_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`): class logits.
            mask_labels (`list[torch.Tensor]`): per image, `(num_targets, target_height, target_width)` binary masks.
            class_labels (`list[torch.Tensor]`): per image, `(num_targets,)` class ids.

        Returns:
            `torch.Tensor` of shape `(batch_size, num_queries, max_num_targets)`, float32 and finite; columns beyond an
            image's own number of targets are padding.
        """
        device = masks_queries_logits.device
        batch_size, num_queries = class_queries_logits.shape[:2]
        num_targets = [int(classes.shape[0]) for classes in class_labels]
        max_num_targets = max(num_targets, default=0)
        canvas_size = canvas_size_of(mask_labels)

        with torch.autocast(device_type=device.type, enabled=False):
            # Classification cost: minus the predicted probability of the target's class (1 - p up to a constant).
            class_probabilities = class_queries_logits.float().softmax(-1)  # (B, Q, K + 1)
            # (B, T_max), padded with class 0; the padded columns are never read by the solver.
            padded_classes = torch.zeros(batch_size, max_num_targets, dtype=torch.long, device=device)
            # Mask tubes (B, Q, T, h, w) are read at the same points in every frame, and costed over all T * P.
            num_frames = math.prod(masks_queries_logits.shape[2:-2])
            padded_point_targets = torch.zeros(
                batch_size, max_num_targets, num_frames * self.num_points, device=device
            )
            # The same points for all predictions and targets of an image: (B, P, 2)
            point_coordinates = sample_uniform_points(batch_size, self.num_points, device)
            # Queries (and frames) are channels: (B, Q, [T,] h, w) -> (B, Q [* T], P) -> (B, Q, [T *] P)
            point_logits = point_sample(masks_queries_logits.float().flatten(1, -3), point_coordinates)
            point_logits = point_logits.view(batch_size, num_queries, -1)
            # Targets arrive as a list of differently sized tensors, so they are read per image.
            for image_index, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
                if classes.shape[0] == 0:
                    continue
                padded_classes[image_index, : classes.shape[0]] = classes.to(device)
                image_points = target_point_coordinates(
                    point_coordinates[image_index : image_index + 1], masks.shape[-2:], canvas_size
                )
                # (T_i, [F,] H, W) -> (1, T_i [* F], H, W) -> (1, T_i [* F], P) -> (T_i, [F *] P)
                padded_point_targets[image_index, : classes.shape[0]] = point_sample(
                    masks.to(device=device, dtype=torch.float32).flatten(0, -3).unsqueeze(0), image_points
                )[0].view(classes.shape[0], -1)
            # (B, Q, K + 1) gathered at (B, Q, T_max) -> (B, Q, T_max)
            cost_class = -class_probabilities.gather(2, padded_classes.unsqueeze(1).expand(-1, num_queries, -1))
            cost_mask = pairwise_sigmoid_cross_entropy(point_logits, padded_point_targets)
            cost_dice = pairwise_dice(point_logits, padded_point_targets)
            costs = self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice
            return torch.nan_to_num(costs, nan=MAX_COST, posinf=MAX_COST, neginf=-MAX_COST).clamp(-MAX_COST, MAX_COST)

    @torch.no_grad()
    def forward(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
        check_targets: bool = True,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Match the queries of each image to its targets.

        Args:
            masks_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, height, width)`): mask logits
                (or mask tubes `(batch_size, num_queries, num_frames, height, width)`, with targets to match).
            class_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`): class logits.
            mask_labels (`list[torch.Tensor]`): per image, `(num_targets, target_height, target_width)` binary masks.
            class_labels (`list[torch.Tensor]`): per image, `(num_targets,)` class ids in `0..num_labels-1`.
            check_targets (`bool`, *optional*, defaults to `True`):
                Validate the targets first (the loss validates once per batch and then skips it).

        Returns:
            `list[tuple[torch.Tensor, torch.Tensor]]`: per image, `(query_indices, target_indices)`, both int64 of
            length `num_targets` on the CPU; query indices are sorted ascending.
        """
        batch_size, num_queries, num_classes_with_null = class_queries_logits.shape
        if check_targets:
            mask_dims = masks_queries_logits.dim() - 1
            validate_targets(mask_labels, class_labels, batch_size, num_queries, num_classes_with_null - 1, mask_dims)
        # One device->host copy for the whole batch; the Hungarian solve is a sequential CPU algorithm per image.
        costs = self.cost_matrices(masks_queries_logits, class_queries_logits, mask_labels, class_labels).cpu()
        indices = []
        for image_index, classes in enumerate(class_labels):
            # (Q, T_max) -> (Q, T_i)
            image_costs = costs[image_index, :, : classes.shape[0]].double().numpy()
            query_indices, target_indices = linear_sum_assignment(image_costs)
            indices.append((torch.as_tensor(query_indices, dtype=torch.int64), torch.as_tensor(target_indices)))
        return [(queries, targets.to(torch.int64)) for queries, targets in indices]
