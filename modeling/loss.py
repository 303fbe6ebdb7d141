"""The Mask2Former training objective.

For the final prediction and, with deep supervision, for every intermediate decoder layer's prediction:

1. match queries to ground-truth segments (Hungarian matching, `matcher.py`);
2. cross-entropy over the K + 1 classes for every query (unmatched queries -> the no-object class, weighted by
   `config.no_object_weight`);
3. sigmoid binary cross-entropy and dice on the matched masks, on `config.train_num_points` points per mask chosen
   mostly where the prediction is uncertain (`point_sampling.py`).

The mask terms are summed over masks and divided by the number of target masks, averaged over the processes of a
distributed run. Mask tubes of a clip (video Mask2Former: predictions `(B, Q, T, h, w)`, targets `(N, T, H, W)`) are
matched as wholes; their mask terms are taken per frame, each frame with its own points, and divided by the number of
target tubes, as the original video criterion does. The losses come back unweighted; the model multiplies them by
`weight_dict` and sums, as transformers does. Everything is computed in float32 with autocast disabled, whatever the
dtype of the predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .matcher import Mask2FormerHungarianMatcher, canvas_size_of, target_point_coordinates, validate_targets
from .point_sampling import point_sample, sample_points_by_uncertainty


def sigmoid_cross_entropy_loss(
    point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: torch.Tensor
) -> torch.Tensor:
    """
    Binary cross-entropy averaged over the points of each mask, summed over masks, divided by `num_masks`.

    Args:
        point_logits (`torch.Tensor` of shape `(num_matched, num_points)`): predicted logits.
        point_labels (`torch.Tensor` of shape `(num_matched, num_points)`): targets in `[0, 1]`.
        num_masks (`torch.Tensor`): scalar normaliser.
    """
    # (M, P) -> (M,) -> ()
    per_mask = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)
    return per_mask.sum() / num_masks


def dice_loss(point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: torch.Tensor) -> torch.Tensor:
    """
    Dice loss `1 - (2|p t| + 1) / (|p| + |t| + 1)` per mask, summed over masks, divided by `num_masks`.

    Args:
        point_logits (`torch.Tensor` of shape `(num_matched, num_points)`): predicted logits.
        point_labels (`torch.Tensor` of shape `(num_matched, num_points)`): targets in `[0, 1]`.
        num_masks (`torch.Tensor`): scalar normaliser.
    """
    probabilities = point_logits.sigmoid()
    numerator = 2 * (probabilities * point_labels).sum(-1)  # (M,)
    denominator = probabilities.sum(-1) + point_labels.sum(-1)  # (M,)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class Mask2FormerLoss(nn.Module):
    """
    Hungarian-matched classification and point-sampled mask losses, with deep supervision.

    Args:
        config (`Mask2FormerConfig`):
            Reads `num_labels`, `no_object_weight`, `class_weight`, `mask_weight`, `dice_weight` (the matcher's cost
            weights), `train_num_points`, `oversample_ratio` and `importance_sample_ratio`.
        weight_dict (`dict[str, float]`):
            Weights of `loss_cross_entropy`, `loss_mask` and `loss_dice`; kept for the model, which applies them.
        matcher_class_cost (`float`, *optional*):
            Weight of the classification term in the matching cost; defaults to `config.class_weight` (2.0 in the
            paper). Set 1.0 to reproduce older transformers releases, which hard-coded it.

    The persistent buffer `empty_weight` (class weights of the cross-entropy, `no_object_weight` for the last class)
    has transformers' name, so `criterion.empty_weight` in checkpoints loads into it.
    """

    def __init__(self, config, weight_dict: dict[str, float], matcher_class_cost: float | None = None) -> None:
        super().__init__()
        self.num_labels = config.num_labels
        self.weight_dict = weight_dict
        self.eos_coef = config.no_object_weight
        empty_weight = torch.ones(self.num_labels + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

        self.num_points = config.train_num_points
        self.oversample_ratio = config.oversample_ratio
        self.importance_sample_ratio = config.importance_sample_ratio
        self.matcher = Mask2FormerHungarianMatcher(
            cost_class=config.class_weight if matcher_class_cost is None else matcher_class_cost,
            cost_mask=config.mask_weight,
            cost_dice=config.dice_weight,
            num_points=config.train_num_points,
        )

    def get_num_masks(self, class_labels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """
        Number of target masks per process, averaged over all processes, at least 1.

        Each process sums its masks; the sum is all-reduced and divided by the number of processes exactly once.
        (transformers 5.x calls accelerate's `reduce`, which already returns the mean, and then divides by the number
        of processes again, so its mask losses are `world_size` times too large in distributed runs.)

        Returns:
            `torch.Tensor`: float32 scalar on `device`.
        """
        num_masks = torch.tensor(float(sum(len(classes) for classes in class_labels)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks, op=torch.distributed.ReduceOp.SUM)
            num_masks = num_masks / torch.distributed.get_world_size()
        return num_masks.clamp(min=1)

    def loss_labels(
        self,
        class_queries_logits: torch.Tensor,
        class_labels: list[torch.Tensor],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """
        Weighted cross-entropy of every query's class logits; unmatched queries are trained to predict no-object.

        Args:
            class_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`).
            class_labels (`list[torch.Tensor]`): per image, `(num_targets,)` class ids.
            indices: the matcher's output.
        """
        batch_size, num_queries, _ = class_queries_logits.shape
        device = class_queries_logits.device
        image_indices, query_indices, target_indices = flatten_indices(indices, device)
        # Targets of all images in one tensor: a target's global row is its image's offset + its index.
        num_targets = torch.tensor([len(classes) for classes in class_labels], device=device)
        offsets = torch.cumsum(num_targets, 0) - num_targets  # (B,)
        all_classes = torch.cat([classes.reshape(-1) for classes in class_labels]).to(device=device, dtype=torch.long)
        target_classes = torch.full((batch_size, num_queries), self.num_labels, dtype=torch.long, device=device)
        target_classes[image_indices, query_indices] = all_classes[offsets[image_indices] + target_indices]
        # cross_entropy wants classes on dim 1: (B, Q, K + 1) -> (B, K + 1, Q)
        return F.cross_entropy(
            class_queries_logits.float().transpose(1, 2), target_classes, weight=self.empty_weight.float()
        )

    def loss_masks(
        self,
        masks_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Point-sampled sigmoid cross-entropy and dice of the matched masks.

        Args:
            masks_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, [num_frames,] height, width)`).
            mask_labels (`list[torch.Tensor]`): per image, `(num_targets, [num_frames,] target_height, target_width)`
                masks.
            indices: the matcher's output.
            num_masks (`torch.Tensor`): scalar normaliser from `get_num_masks`.

        Returns:
            `(loss_mask, loss_dice)`, float32 scalars.
        """
        device = masks_queries_logits.device
        image_indices, query_indices, _ = flatten_indices(indices, device)
        if image_indices.numel() == 0:
            # No object in the whole batch: no mask term, but keep the graph connected for DDP and backward().
            zero = masks_queries_logits.float().sum() * 0.0
            return zero, zero.clone()
        # Matched predictions, in the matcher's order (image by image): (B, Q, [F,] h, w) -> (M, [F,] h, w); each
        # frame of a mask tube is a mask of its own here, with its own points: -> (M * F, h, w)
        num_frames = math.prod(masks_queries_logits.shape[2:-2])
        matched_logits = masks_queries_logits[image_indices, query_indices].float().flatten(0, -3)
        # (M * F, P, 2), chosen without gradient
        point_coordinates = sample_points_by_uncertainty(
            matched_logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio
        )
        # Matched targets are read image by image because they arrive as a list of differently sized tensors.
        canvas_size = canvas_size_of(mask_labels)
        point_labels = []
        start = 0
        for masks, (_, target_indices) in zip(mask_labels, indices):
            end = start + len(target_indices)
            if end > start:
                target_indices = target_indices.to(device)
                # (M_i * F, P, 2) -> (M_i, F, P, 2), in matched-pair order
                image_points = target_point_coordinates(
                    point_coordinates[start * num_frames : end * num_frames], masks.shape[-2:], canvas_size
                ).unflatten(0, (end - start, num_frames))
                # Every target is matched exactly once (no image has more targets than queries), so the target
                # indices are a permutation: move each pair's points to its target's row and read the full-resolution
                # masks in place instead of copying them into pair order.
                points_by_target = torch.empty_like(image_points)
                points_by_target[target_indices] = image_points
                # (T_i, [F,] H, W) -> (T_i * F, 1, H, W) -> (T_i * F, 1, P) -> (T_i, F, P)
                labels_by_target = point_sample(
                    masks.to(device=device, dtype=torch.float32).flatten(0, -3).unsqueeze(1),
                    points_by_target.flatten(0, 1),
                ).view(end - start, num_frames, -1)
                # back to matched-pair order: (T_i, F, P) -> (M_i, F, P) -> (M_i * F, P)
                point_labels.append(labels_by_target[target_indices].flatten(0, 1))
            start = end
        point_labels = torch.cat(point_labels)  # (M * F, P)
        # (M * F, h, w) -> (M * F, 1, P) -> (M * F, P)
        point_logits = point_sample(matched_logits.unsqueeze(1), point_coordinates).squeeze(1)
        return (
            sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def single_prediction_losses(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
        num_masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Match one decoder layer's prediction and compute its three losses (targets already validated)."""
        indices = self.matcher(
            masks_queries_logits, class_queries_logits, mask_labels, class_labels, check_targets=False
        )
        loss_mask, loss_dice = self.loss_masks(masks_queries_logits, mask_labels, indices, num_masks)
        loss_cross_entropy = self.loss_labels(class_queries_logits, class_labels, indices)
        return {"loss_cross_entropy": loss_cross_entropy, "loss_mask": loss_mask, "loss_dice": loss_dice}

    def forward(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
        auxiliary_predictions: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Compute the unweighted losses of the final and of every auxiliary prediction.

        Args:
            masks_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, height, width)`):
                Final mask logits (any float dtype; computed in float32).
            class_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`):
                Final class logits.
            mask_labels (`list[torch.Tensor]`):
                Per image, binary masks `(num_targets, height, width)`; usually at the padded input resolution (4x the
                predictions). Targets of different sizes are treated as zero-padded at the bottom/right to the largest.
            class_labels (`list[torch.Tensor]`): per image, `(num_targets,)` class ids in `0..num_labels-1`.
            auxiliary_predictions (`list[dict[str, torch.Tensor]]`, *optional*):
                Intermediate predictions, each a dict with `masks_queries_logits` and `class_queries_logits`.

        Returns:
            `dict[str, torch.Tensor]`: float32 scalars `loss_cross_entropy`, `loss_mask`, `loss_dice`, and
            `loss_cross_entropy_{i}`, `loss_mask_{i}`, `loss_dice_{i}` for auxiliary prediction `i`.

        Raises:
            `ValueError`: an image with more targets than queries, a class id outside `0..num_labels-1`, or targets
            whose list lengths or shapes do not fit the predictions.
        """
        batch_size, num_queries, num_classes_with_null = class_queries_logits.shape
        if num_classes_with_null != self.num_labels + 1:
            raise ValueError(
                f"class_queries_logits has {num_classes_with_null} classes on its last axis but the loss was built "
                f"for num_labels + 1 = {self.num_labels + 1} (the last one is no-object)."
            )
        validate_targets(
            mask_labels, class_labels, batch_size, num_queries, self.num_labels, masks_queries_logits.dim() - 1
        )
        device = masks_queries_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            num_masks = self.get_num_masks(class_labels, device)
            losses = self.single_prediction_losses(
                masks_queries_logits, class_queries_logits, mask_labels, class_labels, num_masks
            )
            for layer_index, auxiliary in enumerate(auxiliary_predictions or []):
                auxiliary_losses = self.single_prediction_losses(
                    auxiliary["masks_queries_logits"],
                    auxiliary["class_queries_logits"],
                    mask_labels,
                    class_labels,
                    num_masks,
                )
                losses.update({f"{name}_{layer_index}": value for name, value in auxiliary_losses.items()})
        return losses


def flatten_indices(
    indices: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Concatenate the matcher's per-image indices.

    Returns:
        `(image_indices, query_indices, target_indices)`, each int64 of shape `(num_matched,)` on `device`, image by
        image; target indices are relative to their image.
    """
    image_indices = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(indices)])
    query_indices = torch.cat([queries for queries, _ in indices])
    target_indices = torch.cat([targets for _, targets in indices])
    return image_indices.to(device), query_indices.to(device), target_indices.to(device)
