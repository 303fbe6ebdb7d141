"""Mask2FormerLoss: parity with transformers, perfect predictions, permutation invariance, robustness, autocast."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss as TransformersMask2FormerLoss

from mask2former.modeling.loss import Mask2FormerLoss

WEIGHT_DICT = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def make_config(**overrides) -> Mask2FormerConfig:
    return Mask2FormerConfig(**{"num_labels": 6, "train_num_points": 400, **overrides})


def random_predictions(batch_size, num_queries, num_labels, size, generator, scale=3.0):
    masks_queries_logits = scale * torch.randn(batch_size, num_queries, size, size, generator=generator)
    class_queries_logits = 2 * torch.randn(batch_size, num_queries, num_labels + 1, generator=generator)
    return masks_queries_logits, class_queries_logits


def random_targets(num_targets_per_image, num_labels, size, generator):
    mask_labels, class_labels = [], []
    for count in num_targets_per_image:
        # Blobs rather than salt-and-pepper noise: smooth random fields thresholded at 0.
        coarse = torch.randn(count, 1, size // 8, size // 8, generator=generator)
        fields = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        mask_labels.append((fields > 0).float())
        class_labels.append(torch.randint(0, num_labels, (count,), generator=generator))
    return mask_labels, class_labels


def random_problem(num_targets_per_image=(3, 1, 4), num_queries=8, num_labels=6, num_auxiliary=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(num_targets_per_image)
    # Predictions at 1/4 of the target resolution, as the model makes them.
    masks_queries_logits, class_queries_logits = random_predictions(batch_size, num_queries, num_labels, 16, generator)
    auxiliary = []
    for _ in range(num_auxiliary):
        aux_masks, aux_classes = random_predictions(batch_size, num_queries, num_labels, 16, generator)
        auxiliary.append({"masks_queries_logits": aux_masks, "class_queries_logits": aux_classes})
    mask_labels, class_labels = random_targets(num_targets_per_image, num_labels, 64, generator)
    return masks_queries_logits, class_queries_logits, mask_labels, class_labels, auxiliary


def matchable_problem(num_targets_per_image=(3, 2), seed=0):
    """Like `random_problem`, but every target has one clearly best query (a noisy copy of it, in every layer), so the
    matching does not depend on the random points."""
    masks, classes, mask_labels, class_labels, auxiliary = random_problem(num_targets_per_image, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for layer_masks in [masks] + [layer["masks_queries_logits"] for layer in auxiliary]:
        for image, targets in enumerate(mask_labels):
            # (T, 64, 64) -> (T, 16, 16): the targets at the prediction resolution, as confident noisy logits.
            coarse = F.avg_pool2d(targets[:, None], 4)[:, 0]
            noise = torch.randn(coarse.shape, generator=generator)
            layer_masks[image, 2 : 2 + len(targets)] = 6 * (2 * coarse - 1) + noise
    return masks, classes, mask_labels, class_labels, auxiliary


def total(losses: dict) -> torch.Tensor:
    return sum(
        WEIGHT_DICT[key.rsplit("_", 1)[0] if key[-1].isdigit() else key] * value for key, value in losses.items()
    )


@pytest.mark.parametrize("class_cost", [1.0, 2.0])
@pytest.mark.parametrize("num_targets_per_image", [(3, 1, 4), (2, 5)])
def test_loss_matches_transformers_with_the_same_random_points(class_cost, num_targets_per_image):
    # Both implementations draw their random points in the same order and shapes from the global generator (the
    # matcher's (B, P, 2) uniform points, then per matched mask 3P candidates and P/4 uniform points, layer by layer),
    # so with the same seed they read the same points and the only difference is float rounding: tolerance 1e-5.
    # class_cost 1.0 is the value older transformers releases hard-coded in the matcher; transformers 5.x passes
    # config.class_weight, which we emulate with class_weight=1.0 on its side and matcher_class_cost=1.0 on ours.
    masks, classes, mask_labels, class_labels, auxiliary = random_problem(num_targets_per_image)
    ours = Mask2FormerLoss(make_config(), WEIGHT_DICT, matcher_class_cost=class_cost)
    reference = TransformersMask2FormerLoss(make_config(class_weight=class_cost), WEIGHT_DICT)
    torch.manual_seed(11)
    our_losses = ours(masks, classes, mask_labels, class_labels, auxiliary)
    torch.manual_seed(11)
    reference_losses = reference(masks, classes, mask_labels, class_labels, auxiliary)
    assert set(our_losses) == set(reference_losses) and len(our_losses) == 3 * (1 + len(auxiliary))
    for key, value in reference_losses.items():
        torch.testing.assert_close(our_losses[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_loss_matches_transformers_within_monte_carlo_error_with_independent_points():
    # Without shared seeds the two estimates of each mask term differ by sampling noise only. Their standard
    # deviation is estimated from 12 independent runs of ours; two independent draws differ by sqrt(2) sigma, so a
    # 5 sqrt(2) sigma band (sigma from 12 samples) fails with probability ~1e-4 if both estimate the same
    # expectation. Each target has one clearly best query (a noisy copy of it), so the matching does not depend on
    # the points and the class term, which involves no sampling, must agree to float rounding.
    masks, classes, mask_labels, class_labels, _ = matchable_problem(seed=4)
    config = make_config(train_num_points=2000, class_weight=1.0)
    ours = Mask2FormerLoss(config, WEIGHT_DICT)
    reference = TransformersMask2FormerLoss(config, WEIGHT_DICT)
    samples = []
    for seed in range(12):
        torch.manual_seed(1000 + seed)
        samples.append(ours(masks, classes, mask_labels, class_labels))
    torch.manual_seed(99)
    reference_losses = reference(masks, classes, mask_labels, class_labels)
    for key in ("loss_mask", "loss_dice"):
        values = torch.stack([sample[key] for sample in samples])
        sigma = values.std().item()
        assert sigma > 0
        assert abs(reference_losses[key].item() - samples[0][key].item()) < 5 * math.sqrt(2) * sigma, key
    torch.testing.assert_close(samples[0]["loss_cross_entropy"], reference_losses["loss_cross_entropy"])


def perfect_prediction_losses(canvas_size: int) -> dict:
    """Losses of confident full-resolution predictions equal to three rectangles' masks and classes."""
    num_labels, num_queries = 4, 6
    scale = canvas_size / 64
    mask_labels = torch.zeros(3, canvas_size, canvas_size)
    for index, (top, bottom, left, right) in enumerate([(4, 40, 8, 30), (30, 60, 34, 62), (44, 60, 2, 20)]):
        mask_labels[index, int(top * scale) : int(bottom * scale), int(left * scale) : int(right * scale)] = 1
    class_labels = torch.tensor([2, 0, 3])
    chosen_queries = torch.tensor([4, 1, 2])
    masks_queries_logits = -20 * torch.ones(1, num_queries, canvas_size, canvas_size)
    masks_queries_logits[0, chosen_queries] = 20 * (2 * mask_labels - 1)
    class_queries_logits = torch.full((1, num_queries, num_labels + 1), -20.0)
    class_queries_logits[0, :, num_labels] = 20  # unmatched queries: confidently no-object
    class_queries_logits[0, chosen_queries, num_labels] = -20
    class_queries_logits[0, chosen_queries, class_labels] = 20
    loss = Mask2FormerLoss(make_config(num_labels=num_labels, train_num_points=4000), WEIGHT_DICT)
    torch.manual_seed(0)
    losses = loss(masks_queries_logits, class_queries_logits, [mask_labels], [class_labels])
    generator = torch.Generator().manual_seed(3)
    random_masks, random_classes = random_predictions(1, num_queries, num_labels, 16, generator)
    random_losses = loss(random_masks, random_classes, [mask_labels], [class_labels])
    return losses, random_losses


def test_perfect_predictions_give_near_zero_mask_losses():
    # Bilinear reads blend target and logit only within one pixel of an edge, where 0/1 targets become fractional
    # (BCE > 0 even for the best prediction); the importance sampler deliberately concentrates points there. So the
    # mask losses of perfect predictions are not exactly 0: they are small, and halve when the resolution doubles
    # (the edge band is 1 pixel wide), which shows that nothing but the edge band remains.
    coarse, random_losses = perfect_prediction_losses(128)
    fine, _ = perfect_prediction_losses(256)
    assert coarse["loss_cross_entropy"] < 1e-6 and fine["loss_cross_entropy"] < 1e-6
    assert fine["loss_mask"] < 0.05 and fine["loss_dice"] < 0.025
    assert fine["loss_mask"] < 0.7 * coarse["loss_mask"] and fine["loss_dice"] < 0.7 * coarse["loss_dice"]
    # The same loss on random predictions is far larger, so the bounds above are informative.
    assert random_losses["loss_mask"] > 0.5 and random_losses["loss_dice"] > 0.3
    assert random_losses["loss_cross_entropy"] > 1.0


def test_total_loss_is_invariant_to_permuting_the_queries():
    masks, classes, mask_labels, class_labels, auxiliary = matchable_problem(seed=5)
    config = make_config(train_num_points=2000)
    loss = Mask2FormerLoss(config, WEIGHT_DICT)
    permutation = torch.randperm(masks.shape[1], generator=torch.Generator().manual_seed(1))

    def permuted(tensor):
        return tensor[:, permutation]

    permuted_auxiliary = [{key: permuted(value) for key, value in layer.items()} for layer in auxiliary]
    torch.manual_seed(21)
    original_indices = loss.matcher(masks, classes, mask_labels, class_labels)
    torch.manual_seed(21)
    permuted_indices = loss.matcher(permuted(masks), permuted(classes), mask_labels, class_labels)
    # Equivariance of the matching (same seed -> same points -> permuted cost rows): exact.
    for (queries, targets), (permuted_queries, permuted_targets) in zip(original_indices, permuted_indices):
        assert dict(zip(targets.tolist(), queries.tolist())) == dict(
            zip(permuted_targets.tolist(), permutation[permuted_queries].tolist())
        )
    # With the same seed the matching is the same, so the class term (no sampling) is exact. The mask terms give each
    # matched mask its own random points in query order, so permuting the queries redistributes the draws: agreement
    # within Monte-Carlo error, with sigma measured over 10 seeds (5 sqrt(2) sigma, see the parity test).
    totals = []
    for seed in range(10):
        torch.manual_seed(seed)
        totals.append(total(loss(masks, classes, mask_labels, class_labels, auxiliary)))
    torch.manual_seed(100)
    original = loss(masks, classes, mask_labels, class_labels, auxiliary)
    torch.manual_seed(100)
    permuted_losses = loss(permuted(masks), permuted(classes), mask_labels, class_labels, permuted_auxiliary)
    for key in original:
        if key.startswith("loss_cross_entropy"):
            torch.testing.assert_close(permuted_losses[key], original[key], rtol=1e-6, atol=1e-7)
    sigma = torch.stack(totals).std().item()
    assert abs(total(permuted_losses).item() - total(original).item()) < 5 * math.sqrt(2) * sigma


def test_deep_supervision_applies_the_loss_to_every_auxiliary_prediction():
    masks, classes, mask_labels, class_labels, auxiliary = random_problem((2, 3), num_auxiliary=3)
    loss = Mask2FormerLoss(make_config(), WEIGHT_DICT)
    torch.manual_seed(8)
    losses = loss(masks, classes, mask_labels, class_labels, auxiliary)
    expected_keys = {
        f"loss_{name}{suffix}" for name in ("cross_entropy", "mask", "dice") for suffix in ("", "_0", "_1", "_2")
    }
    assert set(losses) == expected_keys
    # Each layer is matched and sampled on its own, in order: replaying the random stream layer by layer reproduces
    # every auxiliary loss exactly.
    torch.manual_seed(8)
    alone = [loss(masks, classes, mask_labels, class_labels)]
    alone += [
        loss(layer["masks_queries_logits"], layer["class_queries_logits"], mask_labels, class_labels)
        for layer in auxiliary
    ]
    for layer_index, layer_losses in enumerate(alone):
        suffix = "" if layer_index == 0 else f"_{layer_index - 1}"
        for name, value in layer_losses.items():
            torch.testing.assert_close(losses[name + suffix], value, rtol=0, atol=0)
    # Every prediction receives gradient.
    tensors = [masks, classes] + [value for layer in auxiliary for value in layer.values()]
    for tensor in tensors:
        tensor.requires_grad_(True)
    torch.manual_seed(8)
    total(loss(masks, classes, mask_labels, class_labels, auxiliary)).backward()
    assert all(tensor.grad is not None and tensor.grad.abs().sum() > 0 for tensor in tensors)


def test_images_without_objects_get_only_the_no_object_term():
    masks, classes, mask_labels, class_labels, auxiliary = random_problem((0, 0), num_auxiliary=1)
    masks.requires_grad_(True)
    classes.requires_grad_(True)
    loss = Mask2FormerLoss(make_config(), WEIGHT_DICT)
    losses = loss(masks, classes, mask_labels, class_labels, auxiliary)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    # Every query's target is no-object; the class weights are then all equal and cancel in the weighted mean.
    expected = -classes.log_softmax(-1)[..., -1].mean()
    torch.testing.assert_close(losses["loss_cross_entropy"], expected)
    total(losses).backward()
    assert masks.grad is not None and torch.all(masks.grad == 0)

    # One empty image beside a full one: finite, and the empty image's queries are all pushed to no-object.
    masks, classes, mask_labels, class_labels, auxiliary = random_problem((0, 3), num_auxiliary=0)
    losses = loss(masks, classes, mask_labels, class_labels)
    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["loss_mask"] > 0


def test_targets_that_cropping_left_empty_give_finite_losses_and_gradients():
    masks, classes, mask_labels, class_labels, auxiliary = random_problem((3, 2), num_auxiliary=1)
    mask_labels[0][1] = 0
    mask_labels[1][:] = 0
    for tensor in [masks, classes]:
        tensor.requires_grad_(True)
    losses = Mask2FormerLoss(make_config(), WEIGHT_DICT)(masks, classes, mask_labels, class_labels, auxiliary)
    assert all(torch.isfinite(value) for value in losses.values())
    total(losses).backward()
    assert torch.isfinite(masks.grad).all() and torch.isfinite(classes.grad).all()


def test_more_targets_than_queries_is_a_clear_error():
    masks, classes, mask_labels, class_labels, _ = random_problem((2, 9), num_queries=8, num_auxiliary=0)
    with pytest.raises(ValueError, match="Image 1 has 9 target segments but the model has only 8 queries"):
        Mask2FormerLoss(make_config(), WEIGHT_DICT)(masks, classes, mask_labels, class_labels)


@pytest.mark.parametrize("bad_id", [6, 255, -3])
def test_class_ids_outside_the_label_range_are_rejected_with_the_id(bad_id):
    masks, classes, mask_labels, class_labels, _ = random_problem((2, 3), num_auxiliary=0)
    class_labels[0][1] = bad_id
    with pytest.raises(ValueError, match=rf"class_labels\[0\] contains class id {bad_id}, outside 0\.\.5"):
        Mask2FormerLoss(make_config(), WEIGHT_DICT)(masks, classes, mask_labels, class_labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_are_float32_under_autocast(dtype):
    masks, classes, mask_labels, class_labels, auxiliary = random_problem((2, 3), num_auxiliary=1)
    low = [masks.to(dtype), classes.to(dtype)]
    low_auxiliary = [{key: value.to(dtype) for key, value in layer.items()} for layer in auxiliary]
    loss = Mask2FormerLoss(make_config(), WEIGHT_DICT)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_losses = loss(*low, mask_labels, class_labels, low_auxiliary)
    torch.manual_seed(2)
    upcast = [{key: value.float() for key, value in layer.items()} for layer in low_auxiliary]
    float_losses = loss(low[0].float(), low[1].float(), mask_labels, class_labels, upcast)
    for key, value in float_losses.items():
        assert low_losses[key].dtype == torch.float32, key
        # Same numbers as a float32 run on the same low-precision logits: no step ran in low precision.
        torch.testing.assert_close(low_losses[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_smaller_targets_count_as_zero_padded_to_the_largest():
    masks, classes, mask_labels, class_labels, _ = random_problem((2, 3), num_auxiliary=0)
    cropped = [mask_labels[0][:, :50, :44], mask_labels[1]]
    padded = [F.pad(cropped[0], (0, 20, 0, 14)), mask_labels[1]]
    loss = Mask2FormerLoss(make_config(), WEIGHT_DICT)
    torch.manual_seed(4)
    from_cropped = loss(masks, classes, cropped, class_labels)
    torch.manual_seed(4)
    from_padded = loss(masks, classes, padded, class_labels)
    for key, value in from_padded.items():
        torch.testing.assert_close(from_cropped[key], value, rtol=1e-5, atol=1e-6, msg=key)


DISTRIBUTED_WORKER = textwrap.dedent(
    """
    import json, types, torch
    from mask2former.modeling.loss import Mask2FormerLoss

    torch.distributed.init_process_group("gloo")  # rank, world size and rendezvous from the environment
    rank = torch.distributed.get_rank()
    # Rank 0 holds 3 masks, rank 1 holds 5: the average is 4.
    class_labels = [torch.zeros(size, dtype=torch.long) for size in ([3] if rank == 0 else [2, 3])]
    # The loss' config fields only: importing transformers would double this test's time.
    config = types.SimpleNamespace(
        num_labels=4, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        train_num_points=16, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )
    num_masks = Mask2FormerLoss(config, {}).get_num_masks(class_labels, torch.device("cpu"))
    print(json.dumps({"rank": rank, "num_masks": num_masks.item()}))
    torch.distributed.destroy_process_group()
    """
)


def test_num_masks_is_averaged_over_processes_exactly_once():
    # Two real gloo processes.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        processes.append(
            subprocess.Popen([sys.executable, "-c", DISTRIBUTED_WORKER], env=env, stdout=subprocess.PIPE, text=True)
        )
    results = []
    try:
        for process in processes:
            stdout, _ = process.communicate(timeout=180)
            assert process.returncode == 0
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert sorted(result["rank"] for result in results) == [0, 1]
    assert all(result["num_masks"] == 4.0 for result in results)


def test_transformers_divides_num_masks_by_the_world_size_twice(monkeypatch):
    # Documents the reference's defect without a second process: accelerate's `reduce` defaults to the *mean* over
    # processes, and transformers divides its result by the number of processes again. Rank 0 of the two-process
    # world above holds 3 masks; the all-reduced mean is 4; transformers ends with 2.
    import inspect

    import accelerate.utils
    import transformers.models.mask2former.modeling_mask2former as reference_module

    assert inspect.signature(accelerate.utils.reduce).parameters["reduction"].default == "mean"

    class TwoProcessState:
        _shared_state = {"initialised": True}
        num_processes = 2

    def mean_over_two_processes(tensor, reduction="mean"):
        assert reduction == "mean"
        return (tensor + 5.0) / 2  # rank 1 holds 5 masks

    monkeypatch.setattr(reference_module, "PartialState", TwoProcessState)
    monkeypatch.setattr(reference_module, "reduce", mean_over_two_processes)
    reference = TransformersMask2FormerLoss(Mask2FormerConfig(num_labels=4), {})
    num_masks = reference.get_num_masks([torch.zeros(3, dtype=torch.long)], torch.device("cpu"))
    assert num_masks.item() == 2.0
