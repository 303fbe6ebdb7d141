"""The matcher and the point-sampled losses on mask tubes (video Mask2Former): matching on points shared by a tube's
frames, per-frame mask losses normalised by the number of tubes, on hand-built cases."""

import torch

from mask2former import VideoMask2FormerConfig
from mask2former.modeling.loss import Mask2FormerLoss
from mask2former.modeling.matcher import Mask2FormerHungarianMatcher


def square_tube(num_frames: int, size: int, boxes: list[tuple[int, int, int, int] | None]) -> torch.Tensor:
    """`(T, size, size)` binary tube with one box ``(y0, y1, x0, x1)`` per frame (None = absent from that frame)."""
    tube = torch.zeros(num_frames, size, size)
    for frame, box in enumerate(boxes):
        if box is not None:
            y0, y1, x0, x1 = box
            tube[frame, y0:y1, x0:x1] = 1
    return tube


def as_logits(tubes: torch.Tensor, scale: float = 8.0) -> torch.Tensor:
    return (tubes * 2 - 1) * scale


def test_matching_is_decided_by_the_whole_tube():
    # target 0 sits top-left in every frame, target 1 bottom-right. Query 0 follows target 0 for two frames and then
    # jumps to target 1; query 1 follows target 1 throughout; query 2 predicts nothing. Frame by frame, query 0 would
    # win target 1 in the last frame; over the tube it belongs to target 0.
    top_left, bottom_right = (0, 8, 0, 8), (8, 16, 8, 16)
    targets = torch.stack([square_tube(3, 16, [top_left] * 3), square_tube(3, 16, [bottom_right] * 3)])  # (2, T, H, W)
    predictions = torch.stack(
        [
            square_tube(3, 16, [top_left, top_left, bottom_right]),
            square_tube(3, 16, [bottom_right] * 3),
            torch.zeros(3, 16, 16),
        ]
    )  # (Q, T, H, W)
    class_logits = torch.zeros(1, 3, 3)  # no class preference
    matcher = Mask2FormerHungarianMatcher(num_points=256)
    [(queries, matched)] = matcher(as_logits(predictions)[None], class_logits, [targets], [torch.tensor([0, 1])])
    assert queries.tolist() == [0, 1]
    assert matched.tolist() == [0, 1]


def test_tube_cost_is_taken_on_points_shared_by_all_frames():
    generator = torch.Generator().manual_seed(0)
    num_queries, num_frames, num_points = 4, 3, 50
    prediction = torch.randn(1, num_queries, num_frames, 8, 8, generator=generator) * 3
    targets = (torch.rand(2, num_frames, 16, 16, generator=generator) > 0.5).float()
    class_logits = torch.randn(1, num_queries, 3, generator=generator)
    classes = torch.tensor([1, 0])
    matcher = Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)

    torch.manual_seed(7)
    costs = matcher.cost_matrices(prediction, class_logits, [targets], [classes])[0]  # (Q, 2)
    torch.manual_seed(7)
    points = torch.rand(1, num_points, 2)  # the matcher's one draw: one point set for every frame

    def read(maps: torch.Tensor) -> torch.Tensor:  # (T, h, w) at the points -> (T * P,)
        grid = (2 * points - 1)[:, :, None].expand(num_frames, -1, -1, -1)
        sampled = torch.nn.functional.grid_sample(maps[:, None], grid, align_corners=False)  # (T, 1, P, 1)
        return sampled.flatten()

    probabilities = class_logits[0].softmax(-1)
    for query in range(num_queries):
        logits = read(prediction[0, query])
        for target in range(2):
            labels = read(targets[target])
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            sigmoid = logits.sigmoid()
            dice = 1 - (2 * (sigmoid * labels).sum() + 1) / (sigmoid.sum() + labels.sum() + 1)
            expected = -2.0 * probabilities[query, classes[target]] + 5.0 * bce + 5.0 * dice
            torch.testing.assert_close(costs[query, target], expected, rtol=1e-5, atol=1e-5)


def tiny_loss(num_points: int = 64) -> Mask2FormerLoss:
    config = VideoMask2FormerConfig(num_labels=3, train_num_points=num_points)
    return Mask2FormerLoss(config, weight_dict={})


def test_tube_mask_losses_are_per_frame_losses_divided_by_the_number_of_tubes():
    # The tube loss equals the image loss on the tubes' frames taken as separate masks, with the frame-level pairs
    # the tube matching implies, the same random draws, and the number of *tubes* as the normaliser.
    generator = torch.Generator().manual_seed(1)
    batch, num_queries, num_frames = 2, 5, 3
    tubes = torch.randn(batch, num_queries, num_frames, 8, 8, generator=generator) * 2
    targets = [(torch.rand(n, num_frames, 32, 32, generator=generator) > 0.6).float() for n in (2, 3)]
    criterion = tiny_loss()
    indices = [(torch.tensor([1, 4]), torch.tensor([1, 0])), (torch.tensor([0, 2, 3]), torch.tensor([2, 0, 1]))]
    num_tubes = torch.tensor(5.0)

    torch.manual_seed(3)
    tube_mask, tube_dice = criterion.loss_masks(tubes, targets, indices, num_tubes)

    # frames as queries: query q, frame t -> q * T + t; target n, frame t -> n * T + t
    frame_predictions = tubes.flatten(1, 2)  # (B, Q*T, h, w)
    frame_targets = [tube.flatten(0, 1) for tube in targets]  # (N*T, H, W)
    frame_indices = [
        (
            (queries[:, None] * num_frames + torch.arange(num_frames)).flatten(),
            (targets_[:, None] * num_frames + torch.arange(num_frames)).flatten(),
        )
        for queries, targets_ in indices
    ]
    torch.manual_seed(3)
    frame_mask, frame_dice = criterion.loss_masks(frame_predictions, frame_targets, frame_indices, num_tubes)
    torch.testing.assert_close(tube_mask, frame_mask, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tube_dice, frame_dice, rtol=1e-6, atol=1e-7)


def test_every_frame_of_a_tube_counts_and_the_normaliser_counts_tubes():
    target = square_tube(4, 32, [(0, 16, 0, 16), None, (4, 20, 4, 20), (8, 24, 8, 24)])
    wrong_frame = target.clone()
    wrong_frame[1] = 1  # the query claims the whole of the frame the object is absent from
    class_logits = torch.full((1, 2, 4), -10.0)
    class_logits[0, 0, 2] = 10.0
    class_logits[0, 1, 3] = 10.0  # the other query: no object
    criterion = tiny_loss(num_points=256)

    def losses(tube: torch.Tensor) -> dict:
        prediction = torch.stack([as_logits(tube, scale=20.0), torch.full_like(tube, -20.0)])[None]
        torch.manual_seed(0)
        return criterion(prediction, class_logits, [target[None]], [torch.tensor([2])])

    right, wrong = losses(target), losses(wrong_frame)
    assert right["loss_cross_entropy"] < 1e-6
    assert wrong["loss_mask"] > right["loss_mask"] + 1.0  # one frame of confident errors
    assert wrong["loss_dice"] > right["loss_dice"] + 0.5
    assert criterion.get_num_masks([torch.tensor([2])], class_logits.device) == 1  # one tube, whatever T is


def test_a_tube_absent_from_every_sampled_frame_is_still_a_finite_loss():
    targets = [torch.zeros(1, 2, 16, 16)]
    prediction = torch.randn(1, 3, 2, 4, 4, requires_grad=True)
    losses = tiny_loss()(prediction, torch.randn(1, 3, 4), targets, [torch.tensor([0])])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(prediction.grad).all()
