"""Hungarian matcher: optimality against brute force, cost values, finiteness, validation, autocast, padding."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mask2former.modeling.matcher import MAX_COST, Mask2FormerHungarianMatcher


def random_batch(num_targets_per_image, num_queries=5, num_labels=4, prediction_size=8, target_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(num_targets_per_image)
    masks_queries_logits = 3 * torch.randn(
        batch_size, num_queries, prediction_size, prediction_size, generator=generator
    )
    class_queries_logits = 2 * torch.randn(batch_size, num_queries, num_labels + 1, generator=generator)
    mask_labels = [
        (torch.rand(count, target_size, target_size, generator=generator) > 0.5).float()
        for count in num_targets_per_image
    ]
    class_labels = [torch.randint(0, num_labels, (count,), generator=generator) for count in num_targets_per_image]
    return masks_queries_logits, class_queries_logits, mask_labels, class_labels


def pair_cost_by_definition(pred_logits, target_mask, probabilities, target_class, points, weights):
    """The matching cost of one (query, target) pair, written out directly from the paper's definition."""
    grid = (2 * points - 1).view(1, -1, 1, 2)
    pred = F.grid_sample(pred_logits[None, None], grid, align_corners=False).flatten()
    target = F.grid_sample(target_mask[None, None], grid, align_corners=False).flatten()
    bce = F.binary_cross_entropy_with_logits(pred, target)
    probs = pred.sigmoid()
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    class_weight, mask_weight, dice_weight = weights
    return -class_weight * probabilities[target_class] + mask_weight * bce + dice_weight * dice


@pytest.mark.parametrize("weights", [(2.0, 5.0, 5.0), (1.0, 5.0, 5.0), (1.0, 0.0, 0.0), (0.0, 1.0, 3.0)])
@pytest.mark.parametrize("num_targets_per_image", [[3, 0, 5], [1, 4, 2]])
def test_matcher_equals_brute_force_assignment(weights, num_targets_per_image):
    num_points = 64
    inputs = random_batch(num_targets_per_image, seed=len(num_targets_per_image) + sum(num_targets_per_image))
    masks_queries_logits, class_queries_logits, mask_labels, class_labels = inputs
    matcher = Mask2FormerHungarianMatcher(*weights, num_points=num_points)

    torch.manual_seed(123)
    indices = matcher(*inputs)
    # The matcher draws one (B, P, 2) tensor of points; redraw it with the same seed for the independent costs.
    torch.manual_seed(123)
    points = torch.rand(len(num_targets_per_image), num_points, 2)

    num_queries = class_queries_logits.shape[1]
    for image, num_targets in enumerate(num_targets_per_image):
        probabilities = class_queries_logits[image].softmax(-1)
        costs = torch.tensor(
            [
                [
                    pair_cost_by_definition(
                        masks_queries_logits[image, query],
                        mask_labels[image][target],
                        probabilities[query],
                        class_labels[image][target],
                        points[image],
                        weights,
                    ).item()
                    for target in range(num_targets)
                ]
                for query in range(num_queries)
            ]
        ).reshape(num_queries, num_targets)
        # Brute force: try every injective map targets -> queries.
        totals = sorted(
            (sum(costs[query, target].item() for target, query in enumerate(queries)), queries)
            for queries in itertools.permutations(range(num_queries), num_targets)
        )
        best_total, best_queries = totals[0]
        query_indices, target_indices = indices[image]
        assert len(query_indices) == len(target_indices) == num_targets
        assert sorted(target_indices.tolist()) == list(range(num_targets))
        assert torch.all(query_indices[1:] > query_indices[:-1])
        matched_total = costs[query_indices, target_indices].sum().item()
        assert matched_total == pytest.approx(best_total, abs=1e-4)
        if len(totals) > 1 and totals[1][0] > best_total + 1e-3:
            # A unique optimum (class-only costs tie when two targets share a class): the assignment must be it.
            matched = {target: query for query, target in zip(query_indices.tolist(), target_indices.tolist())}
            assert matched == dict(enumerate(best_queries))


def test_matcher_cost_matrix_matches_definition():
    num_points = 50
    inputs = random_batch([2, 3], seed=7)
    masks_queries_logits, class_queries_logits, mask_labels, class_labels = inputs
    weights = (2.0, 5.0, 5.0)
    matcher = Mask2FormerHungarianMatcher(*weights, num_points=num_points)
    torch.manual_seed(5)
    costs = matcher.cost_matrices(*inputs)
    torch.manual_seed(5)
    points = torch.rand(2, num_points, 2)
    assert costs.shape == (2, 5, 3) and costs.dtype == torch.float32
    for image in range(2):
        probabilities = class_queries_logits[image].softmax(-1)
        for query in range(5):
            for target in range(len(class_labels[image])):
                expected = pair_cost_by_definition(
                    masks_queries_logits[image, query],
                    mask_labels[image][target],
                    probabilities[query],
                    class_labels[image][target],
                    points[image],
                    weights,
                )
                torch.testing.assert_close(costs[image, query, target], expected, rtol=1e-5, atol=1e-5)


def test_matcher_default_class_cost_is_the_papers():
    from transformers import Mask2FormerConfig

    from mask2former.modeling.loss import Mask2FormerLoss

    config = Mask2FormerConfig(num_labels=3)
    assert Mask2FormerHungarianMatcher().cost_class == 2.0
    assert Mask2FormerLoss(config, {}).matcher.cost_class == config.class_weight == 2.0
    assert Mask2FormerLoss(config, {}, matcher_class_cost=1.0).matcher.cost_class == 1.0


def test_matcher_class_cost_weight_changes_the_assignment():
    # Query 0 has the right class but a poor mask, query 1 a good mask but a less likely class: the class weight
    # decides the winner.
    target = torch.zeros(1, 8, 8)
    target[0, :, :4] = 1
    good_mask = 6 * (2 * target[0] - 1)
    masks_queries_logits = torch.stack([torch.zeros(8, 8), good_mask])[None]  # (1, 2, 8, 8)
    class_queries_logits = torch.log(torch.tensor([[[0.9, 0.05, 0.05], [0.15, 0.8, 0.05]]]))
    inputs = (masks_queries_logits, class_queries_logits, [target], [torch.tensor([0])])
    chosen = {}
    for class_cost in (1.0, 20.0):
        torch.manual_seed(0)
        chosen[class_cost] = Mask2FormerHungarianMatcher(class_cost, 1.0, 1.0, num_points=256)(*inputs)[0][0].item()
    assert chosen == {1.0: 1, 20.0: 0}


def test_matcher_costs_stay_finite_with_nan_and_inf_predictions():
    masks_queries_logits, class_queries_logits, mask_labels, class_labels = random_batch([3], num_queries=6)
    masks_queries_logits[0, 0] = float("nan")
    masks_queries_logits[0, 1, :, :4] = float("inf")
    masks_queries_logits[0, 1, :, 4:] = -float("inf")
    class_queries_logits[0, 2] = float("nan")
    matcher = Mask2FormerHungarianMatcher(num_points=64)
    costs = matcher.cost_matrices(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
    assert torch.isfinite(costs).all()
    assert costs.abs().max() <= MAX_COST
    ((query_indices, target_indices),) = matcher(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
    # 3 targets and 3 healthy queries (3, 4, 5): the broken queries 0, 1, 2 are the ones left over.
    assert len(target_indices) == 3
    assert query_indices.tolist() == [3, 4, 5]


def test_matcher_handles_images_without_targets():
    inputs = random_batch([0, 2, 0])
    indices = Mask2FormerHungarianMatcher(num_points=32)(*inputs)
    assert [len(queries) for queries, _ in indices] == [0, 2, 0]
    inputs = random_batch([0, 0])
    assert [len(queries) for queries, _ in Mask2FormerHungarianMatcher(num_points=32)(*inputs)] == [0, 0]


def test_matcher_rejects_more_targets_than_queries():
    inputs = random_batch([2, 6], num_queries=5)
    with pytest.raises(ValueError, match="Image 1 has 6 target segments but the model has only 5 queries"):
        Mask2FormerHungarianMatcher(num_points=32)(*inputs)


@pytest.mark.parametrize("bad_id", [4, 17, -1])
def test_matcher_rejects_class_ids_outside_range(bad_id):
    masks_queries_logits, class_queries_logits, mask_labels, class_labels = random_batch([2, 3], num_labels=4)
    class_labels[1][2] = bad_id
    with pytest.raises(ValueError, match=rf"class_labels\[1\] contains class id {bad_id}, outside 0\.\.3"):
        Mask2FormerHungarianMatcher(num_points=32)(
            masks_queries_logits, class_queries_logits, mask_labels, class_labels
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matcher_costs_are_float32_under_autocast(dtype):
    masks_queries_logits, class_queries_logits, mask_labels, class_labels = random_batch([2, 3])
    low_masks, low_classes = masks_queries_logits.to(dtype), class_queries_logits.to(dtype)
    matcher = Mask2FormerHungarianMatcher(num_points=64)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        costs = matcher.cost_matrices(low_masks, low_classes, mask_labels, class_labels)
    torch.manual_seed(3)
    expected = matcher.cost_matrices(low_masks.float(), low_classes.float(), mask_labels, class_labels)
    assert costs.dtype == torch.float32
    # Same values as a plain float32 computation on the same (low-precision) logits: nothing ran in low precision.
    torch.testing.assert_close(costs, expected, rtol=1e-6, atol=1e-6)


def test_matcher_treats_smaller_targets_as_zero_padded():
    # Image 0's targets are 12x10, image 1's 16x16: the smaller ones must count as zero-padded bottom/right.
    generator = torch.Generator().manual_seed(2)
    small = (torch.rand(2, 12, 10, generator=generator) > 0.5).float()
    large = (torch.rand(3, 16, 16, generator=generator) > 0.5).float()
    padded_small = F.pad(small, (0, 6, 0, 4))
    masks_queries_logits = torch.randn(2, 5, 4, 4, generator=generator)
    class_queries_logits = torch.randn(2, 5, 4, generator=generator)
    class_labels = [torch.tensor([0, 1]), torch.tensor([2, 0, 1])]
    matcher = Mask2FormerHungarianMatcher(num_points=200)
    torch.manual_seed(9)
    costs = matcher.cost_matrices(masks_queries_logits, class_queries_logits, [small, large], class_labels)
    torch.manual_seed(9)
    expected = matcher.cost_matrices(masks_queries_logits, class_queries_logits, [padded_small, large], class_labels)
    torch.testing.assert_close(costs, expected, rtol=1e-5, atol=1e-5)
