"""Point-sampled Mask2Former loss against the same loss on whole masks: time and peak memory, forward + backward.

Setting (the issue's): batch 2, 100 queries, predicted masks at 1/4 of a 1024x1024 input (256x256), targets at the
input resolution, `--num-targets` segments per image, one prediction (deep supervision multiplies every variant by
the number of decoder layers alike). Each variant runs the Hungarian matching and the loss forward, then backward to
the mask logits:

- ``points``: ours (`modeling/loss.py`), K = 12544 points for the matcher and the losses (importance sampling,
  oversample 3, importance 0.75);
- ``transformers``: transformers' `Mask2FormerLoss`, the same point-sampled loss (the reference);
- ``dense@256``: the same costs and losses on every pixel of the 256x256 predictions (targets area-downsampled);
- ``dense@1024``: the same on every pixel at the target resolution, predictions bilinearly upsampled, as MaskFormer
  computed its mask loss (matching done image by image to keep its peak down).

Memory is measured honestly on the CPU: the PyTorch profiler with ``profile_memory=True`` records every allocation and
free of the CPU allocator with its size and time; the peak is the maximum of their running sum over the measured
call (forward + backward), above what was allocated before it. Time is the median wall-clock of ``--repeats`` runs
without the profiler. Everything runs in one process and prints ratios, because the machine may be shared.

    python bench/loss.py [--repeats 3] [--num-targets 15] [--skip-1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.profiler import ProfilerActivity, profile

from mask2former.modeling.loss import Mask2FormerLoss, dice_loss, flatten_indices, sigmoid_cross_entropy_loss
from mask2former.modeling.matcher import pairwise_dice, pairwise_sigmoid_cross_entropy


class Config:
    """The loss fields of Mask2FormerConfig with the paper's values."""

    num_labels = 133
    no_object_weight = 0.1
    class_weight = 2.0
    mask_weight = 5.0
    dice_weight = 5.0
    train_num_points = 12544
    oversample_ratio = 3.0
    importance_sample_ratio = 0.75


class DenseLoss(Mask2FormerLoss):
    """The same matching costs and losses, evaluated on every pixel at `resolution` instead of on sampled points."""

    def __init__(self, config, resolution: int) -> None:
        super().__init__(config, {})
        self.resolution = resolution

    def to_resolution(self, masks: torch.Tensor, is_target: bool) -> torch.Tensor:
        # (N, h, w) -> (N, resolution * resolution)
        if masks.shape[-1] != self.resolution:
            mode = "area" if is_target and masks.shape[-1] > self.resolution else "bilinear"
            kwargs = {} if mode == "area" else {"align_corners": False}
            masks = F.interpolate(masks[:, None], size=(self.resolution,) * 2, mode=mode, **kwargs)[:, 0]
        return masks.flatten(1)

    @torch.no_grad()
    def match(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        indices = []
        for image, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
            probabilities = class_queries_logits[image].float().softmax(-1)  # (Q, K + 1)
            predictions = self.to_resolution(masks_queries_logits[image].float(), is_target=False)  # (Q, HW)
            targets = self.to_resolution(masks.float(), is_target=True)  # (T, HW)
            costs = (
                -self.matcher.cost_class * probabilities[:, classes]
                + self.matcher.cost_mask * pairwise_sigmoid_cross_entropy(predictions[None], targets[None])[0]
                + self.matcher.cost_dice * pairwise_dice(predictions[None], targets[None])[0]
            )
            rows, columns = linear_sum_assignment(costs.nan_to_num(1e8).clamp(-1e8, 1e8).cpu().double().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(columns, dtype=torch.int64)))
        return indices

    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        indices = self.match(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        num_masks = self.get_num_masks(class_labels, masks_queries_logits.device)
        image_indices, query_indices, _ = flatten_indices(indices, masks_queries_logits.device)
        # (M, HW) predictions and targets, matched pairs in the same order
        predictions = self.to_resolution(masks_queries_logits[image_indices, query_indices].float(), is_target=False)
        targets = torch.cat(
            [
                self.to_resolution(masks[columns].float(), is_target=True)
                for masks, (_, columns) in zip(mask_labels, indices)
            ]
        )
        return {
            "loss_cross_entropy": self.loss_labels(class_queries_logits, class_labels, indices),
            "loss_mask": sigmoid_cross_entropy_loss(predictions, targets, num_masks),
            "loss_dice": dice_loss(predictions, targets, num_masks),
        }


def transformers_loss():
    """transformers' Mask2FormerLoss with the same settings (same sampling, dense copies of the matched targets)."""
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss as TransformersMask2FormerLoss

    fields = {name: value for name, value in vars(Config).items() if not name.startswith("_")}
    return TransformersMask2FormerLoss(Mask2FormerConfig(**fields), {})


def make_inputs(batch_size: int, num_queries: int, num_targets: int, image_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prediction_size = image_size // 4
    masks_queries_logits = torch.randn(batch_size, num_queries, prediction_size, prediction_size, generator=generator)
    class_queries_logits = torch.randn(batch_size, num_queries, Config.num_labels + 1, generator=generator)
    mask_labels, class_labels = [], []
    for _ in range(batch_size):
        # Smooth random blobs at the input resolution.
        coarse = torch.randn(num_targets, 1, image_size // 64, image_size // 64, generator=generator)
        fields = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
        mask_labels.append((fields > 0.5).float())
        class_labels.append(torch.randint(0, Config.num_labels, (num_targets,), generator=generator))
    return masks_queries_logits, class_queries_logits, mask_labels, class_labels


def forward_backward(loss_module, inputs) -> None:
    masks_queries_logits, class_queries_logits, mask_labels, class_labels = inputs
    masks_queries_logits = masks_queries_logits.detach().requires_grad_(True)
    class_queries_logits = class_queries_logits.detach().requires_grad_(True)
    losses = loss_module(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
    sum(losses.values()).backward()


def peak_memory_bytes(loss_module, inputs) -> int:
    """Peak of the running sum of CPU allocator events (allocations positive, frees negative) during one call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        forward_backward(loss_module, inputs)
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    live, peak = 0, 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def median_seconds(loss_module, inputs, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward(loss_module, inputs)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--num-targets", type=int, default=15, help="ground-truth segments per image")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--skip-1024", action="store_true", help="leave out the dense loss at the input resolution")
    args = parser.parse_args()

    inputs = make_inputs(args.batch_size, args.num_queries, args.num_targets, args.image_size)
    variants = {"points": Mask2FormerLoss(Config(), {}), "transformers": transformers_loss()}
    variants[f"dense@{args.image_size // 4}"] = DenseLoss(Config(), args.image_size // 4)
    if not args.skip_1024:
        variants[f"dense@{args.image_size}"] = DenseLoss(Config(), args.image_size)
    print(
        f"batch {args.batch_size}, {args.num_queries} queries, predictions {args.image_size // 4}^2, targets "
        f"{args.image_size}^2, {args.num_targets} targets/image, K={Config.train_num_points} points; "
        f"torch threads {torch.get_num_threads()}"
    )
    results = {}
    for name, loss_module in variants.items():
        forward_backward(loss_module, inputs)  # warm-up
        results[name] = (median_seconds(loss_module, inputs, args.repeats), peak_memory_bytes(loss_module, inputs))
    # The gradients of the two logits tensors are allocated (and kept) by every variant alike; the working memory of
    # the loss itself is what lies above them.
    gradient_bytes = sum(tensor.numel() * tensor.element_size() for tensor in inputs[:2])
    reference_time, reference_memory = results["points"]
    print(f"logits gradients (in every peak): {gradient_bytes / 2**20:.1f} MiB")
    header = f"{'variant':<12} {'time (s)':>9} {'peak (MiB)':>11} {'above grads':>12} {'time ratio':>11}"
    print(header + f" {'peak ratio':>11} {'above-grads ratio':>18}")
    for name, (seconds, peak) in results.items():
        print(
            f"{name:<12} {seconds:>9.3f} {peak / 2**20:>11.1f} {(peak - gradient_bytes) / 2**20:>12.1f} "
            f"{seconds / reference_time:>11.2f} {peak / reference_memory:>11.2f} "
            f"{(peak - gradient_bytes) / (reference_memory - gradient_bytes):>18.2f}"
        )
    print("ratios are variant / points")


if __name__ == "__main__":
    main()
