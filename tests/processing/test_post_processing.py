"""Post-processing: the cell-bounded decision equals dense upsampling; COCO ground truth turned into confident
logits comes back (PQ, mIoU); thresholds, fusion, binary maps, RLE, padding and bad input.

Deliberate differences from transformers' post-processing (its defects, see DESIGN.md): no 384x384 intermediate,
the padded region is cropped before resizing, `mask_threshold` and `overlap_mask_area_threshold` are honoured for
instances, panoptic `segments_info` has one entry per (fused) segment.
"""

import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mask2former import Mask2FormerImageProcessor
from mask2former.processing import decision, post_processing, upsampling


def _outputs(class_logits, mask_logits):
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def _blobs(num_maps, height, width, generator, sharpness=2.0):
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    maps = []
    for _ in range(num_maps):
        centre_row = torch.randint(0, height, (1,), generator=generator)
        centre_col = torch.randint(0, width, (1,), generator=generator)
        radius = torch.randint(3, max(4, height // 2), (1,), generator=generator)
        distance = ((rows - centre_row) ** 2 + (cols - centre_col) ** 2).float().sqrt()
        maps.append((radius - distance) / sharpness)
    return torch.stack(maps)  # (N, h, w)


# ----------------------------------------------------------------------------------------------------------------
# The shared building blocks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(200, 304), (37, 51), (123, 77)])
def test_grid_upsampling_equals_interpolate(target):
    maps = torch.randn(4, 50, 76)
    grid = post_processing.bilinear_grid((50, 76), target)
    expected = F.interpolate(maps[None], size=target, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(post_processing.upsample_bilinear(maps, grid), expected, atol=1e-5, rtol=0)
    rows, cols = torch.randint(0, target[0], (100,)), torch.randint(0, target[1], (100,))
    torch.testing.assert_close(
        post_processing.sample_bilinear(maps, grid, rows, cols), expected[:, rows, cols], atol=1e-5, rtol=0
    )
    # A band of rows starting and ending inside a source row's span is the same band of the whole.
    start, stop = target[0] // 3 + 1, 2 * target[0] // 3 + 2
    torch.testing.assert_close(
        upsampling.upsample_rows(maps, grid, start, stop), expected[:, start:stop], atol=1e-5, rtol=0
    )


# How a tile's undecided pixels are evaluated: the default choice, always one by one, always densely (any tile with
# an undecided pixel), and the default with one-row tiles and dense steps (the chunking itself).
_MODES = {
    "default": {},
    "one-by-one": {(decision, "DENSE_SHARE"): 2.0},
    "dense": {(decision, "DENSE_SHARE"): 0.0},
    "tiny-tiles": {(upsampling, "TILE_ELEMENTS"): 1, (upsampling, "DENSE_ELEMENTS"): 1},
}


def _set_mode(monkeypatch, mode):
    for (module, name), value in _MODES[mode].items():
        monkeypatch.setattr(module, name, value)


def _noise(num_maps, height, width, generator):
    return torch.randn(num_maps, height, width, generator=generator) * 3


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("maps_kind", ["blobs", "noise"])
@pytest.mark.parametrize("target", [(200, 304), (41, 60)])
def test_cell_decision_equals_dense_decision(monkeypatch, target, maps_kind, mode):
    _set_mode(monkeypatch, mode)
    generator = torch.Generator().manual_seed(1)
    logits = (_blobs if maps_kind == "blobs" else _noise)(12, 50, 76, generator)
    weights = torch.rand(12, generator=generator)
    grid = post_processing.bilinear_grid((50, 76), target)
    decision = post_processing.decide_upsampled(logits, grid, weights, logit_threshold=0.0)
    # Dense reference: upsample everything, weight, argmax.
    dense = F.interpolate(logits[None], size=target, mode="bilinear", align_corners=False)[0]
    winner = (weights[:, None, None] * dense.sigmoid()).argmax(0)
    covered = dense.gather(0, winner[None])[0] >= 0
    expected = torch.where(covered, winner, -1)
    rendered = decision.render(torch.arange(12), fill=-1)
    assert (rendered != expected).float().mean() < 1e-4
    won, won_covered = decision.areas()
    assert (won - torch.bincount(winner.flatten(), minlength=12)).abs().max() <= 2
    assert (won_covered - torch.bincount(winner[covered], minlength=12)).abs().max() <= 2
    assert (decision.covered_area - (dense >= 0).flatten(1).sum(1)).abs().max() <= 2


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("maps_kind", ["blobs", "noise"])
def test_class_mixture_decision_equals_dense_argmax(monkeypatch, maps_kind, mode):
    # Semantic inference: winners are classes of sum_q p(class | q) sigmoid(mask_q).
    _set_mode(monkeypatch, mode)
    generator = torch.Generator().manual_seed(2)
    logits = (_blobs if maps_kind == "blobs" else _noise)(10, 30, 40, generator)
    class_weights = (torch.randn(10, 7, generator=generator) * 3).softmax(-1)
    grid = post_processing.bilinear_grid((30, 40), (120, 150))
    decision = post_processing.decide_upsampled(logits, grid, class_weights=class_weights)
    dense = F.interpolate(logits[None], size=(120, 150), mode="bilinear", align_corners=False)[0].sigmoid()
    expected = torch.einsum("qk,qhw->khw", class_weights, dense).argmax(0)
    assert (decision.render(torch.arange(7), fill=-1) != expected).float().mean() < 1e-4


def test_semantic_decision_equals_dense_argmax():
    scores = torch.rand(7, 30, 40)
    grid = post_processing.bilinear_grid((30, 40), (120, 160))
    decision = post_processing.decide_upsampled(scores, grid)
    expected = F.interpolate(scores[None], size=(120, 160), mode="bilinear", align_corners=False)[0].argmax(0)
    assert (decision.render(torch.arange(7), fill=0) != expected).float().mean() < 1e-4


def test_undecided_tiles_switch_to_dense_upsampling():
    # Per-pixel noise leaves nearly every cell undecided: those tiles go dense; sharp blobs (a trained model's masks)
    # are decided per cell but for their boundaries, evaluated one by one.
    generator = torch.Generator().manual_seed(5)
    grid = post_processing.bilinear_grid((50, 76), (200, 304))
    weights = torch.rand(12, generator=generator)
    noisy = post_processing.decide_upsampled(_noise(12, 50, 76, generator), grid, weights, logit_threshold=0.0)
    sharp = _blobs(12, 50, 76, generator, sharpness=0.25)
    smooth = post_processing.decide_upsampled(sharp, grid, weights, logit_threshold=0.0)
    assert noisy.dense_pixels == 200 * 304 and noisy.evaluated_pixels == 0
    assert smooth.dense_pixels == 0 and 0 < smooth.evaluated_pixels < 0.3 * 200 * 304


def _all_tasks(processor, outputs, target_sizes):
    return (
        processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes),
        processor.post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes, return_segmentation_scores=True
        ),
        processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes, label_ids_to_fuse={1}),
        processor.post_process_instance_segmentation(outputs, target_sizes=target_sizes, threshold=0.2),
        processor.post_process_instance_segmentation(
            outputs, target_sizes=target_sizes, threshold=0.2, return_binary_maps=True
        ),
    )


def _assert_same(first, second):
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        torch.testing.assert_close(first, second, rtol=1e-6, atol=1e-6)  # scores: summation order may differ
    elif isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    elif isinstance(first, dict) or hasattr(first, "keys"):
        assert sorted(first.keys()) == sorted(second.keys())
        for key in first.keys():
            _assert_same(first[key], second[key])
    elif isinstance(first, list | tuple):
        assert len(first) == len(second)
        for a, b in zip(first, second):
            _assert_same(a, b)
    else:
        assert first == second


def test_tiny_tile_budget_gives_identical_results(monkeypatch):
    # Bounded memory comes from tiles and dense steps of a budget; one row at a time must change nothing.
    generator = torch.Generator().manual_seed(6)
    class_logits = torch.randn(2, 12, 5, generator=generator) * 4
    mask_logits = torch.cat([_blobs(6, 30, 44, generator), _noise(6, 30, 44, generator)])[None].repeat(2, 1, 1, 1)
    outputs = _outputs(class_logits, mask_logits)
    processor = Mask2FormerImageProcessor()
    target_sizes = [(97, 130), (120, 176)]
    default = _all_tasks(processor, outputs, target_sizes)
    _set_mode(monkeypatch, "tiny-tiles")
    _assert_same(_all_tasks(processor, outputs, target_sizes), default)


# ----------------------------------------------------------------------------------------------------------------
# COCO ground truth -> confident logits -> post-processing
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _coco_ground_truth(root):
    panoptic = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    categories = sorted(category["id"] for category in panoptic["categories"])
    label_of_category = {category: label for label, category in enumerate(categories)}
    things = {label_of_category[c["id"]] for c in panoptic["categories"] if c["isthing"]}
    samples = []
    for annotation in panoptic["annotations"]:
        png = np.asarray(Image.open(root / "annotations" / "panoptic_val2017" / annotation["file_name"]), np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
        segments = [
            {"id": s["id"], "label": label_of_category[s["category_id"]], "iscrowd": s.get("iscrowd", 0)}
            for s in annotation["segments_info"]
        ]
        samples.append((torch.from_numpy(ids), segments))
    return samples, len(categories), things


@functools.lru_cache(maxsize=1)
def _coco_outputs(root):
    """The COCO sample's ground truth and its confident outputs for the 384-shortest-edge processor (shared)."""
    samples, num_classes, things = _coco_ground_truth(root)
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333})
    outputs, _ = _confident_outputs(processor, samples, num_classes)
    return processor, samples, num_classes, things, outputs


def _confident_outputs(processor, samples, num_classes, num_queries=60, confidence=10.0):
    """Ground-truth segments as queries: class logits peaked on the true class, mask logits +-confidence at 1/4 of
    the resized image (from the area fraction of each 4x4 block), padding at -confidence."""
    resized = [processor.resized_size(*ids.shape) for ids, _ in samples]
    padded = (max(size[0] for size in resized), max(size[1] for size in resized))
    mask_size = (padded[0] // 4, padded[1] // 4)
    class_logits = torch.full((len(samples), num_queries, num_classes + 1), -confidence)
    class_logits[..., -1] = confidence  # unused queries: "no object"
    mask_logits = torch.full((len(samples), num_queries, *mask_size), -confidence)
    for index, ((ids, segments), size) in enumerate(zip(samples, resized)):
        for query, segment in enumerate(segments):
            occupancy = (ids == segment["id"]).float()[None, None]
            occupancy = F.interpolate(occupancy, size=size, mode="bilinear", antialias=True, align_corners=False)
            occupancy = F.interpolate(occupancy, size=(size[0] // 4, size[1] // 4), mode="area")[0, 0]
            mask_logits[index, query, : size[0] // 4, : size[1] // 4] = (occupancy - 0.5) * 2 * confidence
            class_logits[index, query] = -confidence
            class_logits[index, query, segment["label"]] = confidence
    return _outputs(class_logits, mask_logits), padded


def _pair_counts(prediction, prediction_info, ids, segments):
    """`(T+1, P+1)` pixel counts of every (truth segment, predicted segment) pair; row/column 0 = void/nothing."""
    truth_index = torch.zeros_like(ids)
    for position, segment in enumerate(segments):
        truth_index[ids == segment["id"]] = position + 1
    predicted_index = torch.zeros_like(ids)
    for position, info in enumerate(prediction_info):
        predicted_index[prediction.to(ids.device) == info["id"]] = position + 1
    num_truths, num_predictions = len(segments) + 1, len(prediction_info) + 1
    flat = (truth_index * num_predictions + predicted_index).flatten()
    return torch.bincount(flat, minlength=num_truths * num_predictions).reshape(num_truths, num_predictions).double()


def _panoptic_quality(prediction, prediction_info, ids, segments):
    """PQ sums of one image, the COCO definition: a prediction matches a truth of its class at IoU > 0.5; void
    pixels are left out of the union; unmatched predictions mostly on void or on a crowd region of their class are
    not false positives. Returns (IoU sum, TP, FP, FN)."""
    pairs = _pair_counts(prediction, prediction_info, ids, segments)
    truth_area, predicted_area = pairs.sum(1), pairs.sum(0)
    matched_truths, matched_predictions, iou_sum = set(), set(), 0.0
    for t, segment in enumerate(segments, start=1):
        if segment["iscrowd"]:
            continue
        for p, info in enumerate(prediction_info, start=1):
            if info["label_id"] != segment["label"]:
                continue
            union = truth_area[t] + predicted_area[p] - pairs[t, p] - pairs[0, p]
            iou = (pairs[t, p] / union).item() if union > 0 else 0.0
            if iou > 0.5:
                matched_truths.add(t)
                matched_predictions.add(p)
                iou_sum += iou
    false_positives = 0
    for p, info in enumerate(prediction_info, start=1):
        if p in matched_predictions or predicted_area[p] == 0:
            continue
        ignored = pairs[0, p] + sum(
            pairs[t, p] for t, s in enumerate(segments, start=1) if s["iscrowd"] and s["label"] == info["label_id"]
        )
        if ignored / predicted_area[p] <= 0.5:
            false_positives += 1
    num_truth_segments = sum(1 for s in segments if not s["iscrowd"])
    return iou_sum, len(matched_truths), false_positives, num_truth_segments - len(matched_truths)


def test_coco_ground_truth_comes_back_through_panoptic_post_processing(coco_sample_root):
    processor, samples, num_classes, _, outputs = _coco_outputs(coco_sample_root)
    target_sizes = [tuple(ids.shape) for ids, _ in samples]
    results = processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes)

    totals = np.zeros(4)
    for result, (ids, segments) in zip(results, samples):
        prediction = result["segmentation"]
        assert prediction.shape == ids.shape
        totals += _panoptic_quality(prediction, result["segments_info"], ids, segments)
        # Every non-crowd segment above 64 px is recognised with its class (IoU > 0.5).
        pairs = _pair_counts(prediction, result["segments_info"], ids, segments)
        for t, segment in enumerate(segments, start=1):
            if segment["iscrowd"] or pairs[t].sum() <= 64:
                continue
            overlaps = [
                (pairs[t, p] / (pairs[t].sum() + pairs[:, p].sum() - pairs[t, p])).item()
                for p, info in enumerate(result["segments_info"], start=1)
                if info["label_id"] == segment["label"]
            ]
            assert overlaps and max(overlaps) > 0.5, f"segment {segment} was not recovered"
    iou_sum, true_positives, false_positives, false_negatives = totals
    quality = 100 * iou_sum / (true_positives + 0.5 * false_positives + 0.5 * false_negatives)
    assert quality >= 95, f"PQ {quality:.1f}"

    # Deliberate difference: transformers squeezes through 384x384 and does not crop the padding, so the same
    # logits come back worse there.
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    reference = Mask2FormerImageProcessorPil().post_process_panoptic_segmentation(
        outputs, target_sizes=target_sizes, label_ids_to_fuse=set()
    )
    reference_totals = np.zeros(4)
    for result, (ids, segments) in zip(reference, samples):
        reference_totals += _panoptic_quality(result["segmentation"], result["segments_info"], ids, segments)
    reference_quality = 100 * reference_totals[0] / (reference_totals[1:] @ np.array([1, 0.5, 0.5]))
    assert reference_quality < quality


def test_coco_ground_truth_comes_back_through_semantic_post_processing(coco_sample_root):
    processor, samples, num_classes, _, outputs = _coco_outputs(coco_sample_root)
    results = processor.post_process_semantic_segmentation(outputs, target_sizes=[ids.shape for ids, _ in samples])
    intersections, unions = torch.zeros(num_classes), torch.zeros(num_classes)
    for prediction, (ids, segments) in zip(results, samples):
        truth = torch.full_like(ids, -1)
        for segment in segments:
            if not segment["iscrowd"]:
                truth[ids == segment["id"]] = segment["label"]
        valid = truth >= 0
        for label in truth[valid].unique().tolist():
            truth_mask, predicted = (truth == label) & valid, (prediction == label) & valid
            intersections[label] += (truth_mask & predicted).sum()
            unions[label] += (truth_mask | predicted).sum()
    present = unions > 0
    mean_iou = 100 * (intersections[present] / unions[present]).mean().item()
    assert mean_iou >= 95, f"mIoU {mean_iou:.1f}"


def test_coco_instances_come_back_with_their_classes(coco_sample_root):
    processor, samples, num_classes, things, outputs = _coco_outputs(coco_sample_root)
    results = processor.post_process_instance_segmentation(
        outputs, target_sizes=[ids.shape for ids, _ in samples], return_binary_maps=True
    )
    for result, (ids, segments) in zip(results, samples):
        masks = result["segmentation"].flatten(1).float()  # (N, H*W)
        labels = torch.tensor([info["label_id"] for info in result["segments_info"]])
        wanted = [s for s in segments if not s["iscrowd"] and s["label"] in things and (ids == s["id"]).sum() > 64]
        truths = torch.stack([(ids == s["id"]).flatten().float() for s in wanted])  # (T, H*W)
        intersections = truths @ masks.T  # (T, N)
        unions = truths.sum(1, keepdim=True) + masks.sum(1) - intersections
        same_class = torch.tensor([s["label"] for s in wanted])[:, None] == labels[None]
        best = torch.where(same_class, intersections / unions, 0).max(1).values
        assert (best > 0.5).all(), best


# ----------------------------------------------------------------------------------------------------------------
# Behaviour of the options
# ----------------------------------------------------------------------------------------------------------------


def _two_overlapping_queries():
    # Query 0: a large disc of class 1 (score ~1); query 1: a smaller disc of class 2, mostly inside it.
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    large = (10 - ((rows - 16) ** 2 + (cols - 16) ** 2).float().sqrt()) * 2
    small = (5 - ((rows - 22) ** 2 + (cols - 16) ** 2).float().sqrt()) * 2
    class_logits = torch.full((1, 3, 4), -10.0)
    class_logits[0, 0, 1] = 10
    class_logits[0, 1, 2] = class_logits[0, 1, 3] = 2  # class probability ~0.5
    class_logits[0, 2, 3] = 10  # no object
    mask_logits = torch.stack([large, small, torch.full_like(large, -10)])[None]
    return _outputs(class_logits, mask_logits)


def test_instance_overlap_threshold_is_honoured():
    processor = Mask2FormerImageProcessor()
    outputs = _two_overlapping_queries()
    strict = processor.post_process_instance_segmentation(outputs, threshold=0.1, overlap_mask_area_threshold=0.8)[0]
    loose = processor.post_process_instance_segmentation(outputs, threshold=0.1, overlap_mask_area_threshold=0.0)[0]
    # The smaller, lower-scoring disc is mostly hidden: dropped at 0.8, kept at 0.
    assert [info["label_id"] for info in strict["segments_info"]] == [1]
    assert sorted(info["label_id"] for info in loose["segments_info"]) == [1, 2]
    assert set(strict["segmentation"].unique().tolist()) == {-1, 0}


def test_instance_mask_threshold_is_honoured():
    processor = Mask2FormerImageProcessor()
    outputs = _two_overlapping_queries()
    areas = []
    for mask_threshold in (0.2, 0.5, 0.9):
        result = processor.post_process_instance_segmentation(
            outputs,
            threshold=0.1,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=0.0,
            return_binary_maps=True,
        )[0]
        first = [i for i, info in enumerate(result["segments_info"]) if info["label_id"] == 1][0]
        areas.append(result["segmentation"][first].sum().item())
    # transformers binarises at logit 0 whatever mask_threshold is (#44900); here the masks follow it.
    assert areas[0] > areas[1] > areas[2]


def test_instance_rle_decodes_to_the_binary_maps():
    mask_utils = pytest.importorskip("pycocotools.mask")
    processor = Mask2FormerImageProcessor()
    outputs = _two_overlapping_queries()
    binary = processor.post_process_instance_segmentation(
        outputs, threshold=0.1, overlap_mask_area_threshold=0.0, target_sizes=[(100, 90)], return_binary_maps=True
    )[0]
    coco = processor.post_process_instance_segmentation(
        outputs, threshold=0.1, overlap_mask_area_threshold=0.0, target_sizes=[(100, 90)], return_coco_annotation=True
    )[0]
    assert coco["segments_info"] == binary["segments_info"]
    decoded = np.stack([mask_utils.decode(rle) for rle in coco["segmentation"]])
    np.testing.assert_array_equal(decoded, binary["segmentation"].numpy().astype(np.uint8))


def test_panoptic_fusion_and_binary_maps():
    processor = Mask2FormerImageProcessor()
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    left, right = ((8 - cols) * 2.0), ((cols - 24) * 2.0)
    middle = (6 - (cols - 16).abs()).float() * 2
    class_logits = torch.full((1, 3, 6), -10.0)
    class_logits[0, 0, 4] = class_logits[0, 1, 4] = 10  # two queries of "stuff" class 4
    class_logits[0, 2, 1] = 10
    outputs = _outputs(class_logits, torch.stack([left, right, middle])[None].float())
    plain = processor.post_process_panoptic_segmentation(outputs)[0]
    fused = processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={4})[0]
    assert len(plain["segments_info"]) == 3 and not any(info["was_fused"] for info in plain["segments_info"])
    assert [(info["label_id"], info["was_fused"]) for info in fused["segments_info"]] == [(4, True), (1, False)]
    # The two class-4 queries share one id that covers both sides.
    stuff_id = fused["segments_info"][0]["id"]
    assert (fused["segmentation"] == stuff_id).sum() == sum(
        (plain["segmentation"] == info["id"]).sum() for info in plain["segments_info"] if info["label_id"] == 4
    )
    binary = processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={4}, return_binary_maps=True)[0]
    for mask, info in zip(binary["segmentation"], binary["segments_info"]):
        torch.testing.assert_close(mask, fused["segmentation"] == info["id"])


def test_padding_is_cropped_so_batching_does_not_change_results():
    generator = torch.Generator().manual_seed(3)
    processor = Mask2FormerImageProcessor()
    class_logits = torch.full((1, 8, 5), -8.0)
    class_logits[0, :, -1] = 8
    class_logits[0, :4, -1] = -8
    class_logits[0, torch.arange(4), torch.tensor([0, 1, 2, 3])] = 8
    alone = _blobs(8, 24, 40, generator)[None]  # an image whose input is 96x160
    # The same image in a batch padded to 128x224: padding holds strong (wrong) mask logits.
    padded = torch.full((1, 8, 32, 56), 5.0)
    padded[..., :24, :40] = alone
    single = processor.post_process_panoptic_segmentation(_outputs(class_logits, alone), target_sizes=[(300, 500)])
    pixel_mask = torch.zeros(1, 128, 224, dtype=torch.long)
    pixel_mask[:, :96, :160] = 1
    batched = processor.post_process_panoptic_segmentation(
        _outputs(class_logits, padded), target_sizes=[(300, 500)], pixel_mask=pixel_mask
    )
    torch.testing.assert_close(batched[0]["segmentation"], single[0]["segmentation"])
    assert batched[0]["segments_info"] == single[0]["segments_info"]
    # Without pixel_mask the processor recomputes the valid region from the target size (the pipeline's case).
    recomputed = Mask2FormerImageProcessor(size={"height": 96, "width": 160}).post_process_panoptic_segmentation(
        _outputs(class_logits, padded), target_sizes=[(300, 500)]
    )
    torch.testing.assert_close(recomputed[0]["segmentation"], single[0]["segmentation"])
    semantic_single = processor.post_process_semantic_segmentation(_outputs(class_logits, alone), [(300, 500)])
    semantic_batched = processor.post_process_semantic_segmentation(
        _outputs(class_logits, padded), [(300, 500)], pixel_mask=pixel_mask
    )
    torch.testing.assert_close(semantic_batched[0], semantic_single[0])
    # image_sizes gives the valid region in input pixels directly.
    explicit = processor.post_process_panoptic_segmentation(
        _outputs(class_logits, padded), target_sizes=[(300, 500)], image_sizes=[(96, 160)]
    )
    torch.testing.assert_close(explicit[0]["segmentation"], single[0]["segmentation"])
    # With scores, their argmax is the map (dense path, same grid).
    with_scores = processor.post_process_semantic_segmentation(
        _outputs(class_logits, alone), [(300, 500)], return_segmentation_scores=True
    )[0]
    assert with_scores["segmentation_scores"].shape == (4, 300, 500)
    agreement = (with_scores["segmentation_scores"].argmax(0) == with_scores["segmentation"]).float().mean()
    assert agreement > 0.999


def test_semantic_agrees_with_transformers_where_no_padding():
    # Same paper formula; the remaining differences come from transformers' 384x384 intermediate resize.
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    generator = torch.Generator().manual_seed(4)
    class_logits = torch.randn(2, 10, 6, generator=generator) * 3
    mask_logits = torch.stack([_blobs(10, 48, 64, generator) for _ in range(2)])
    outputs = _outputs(class_logits, mask_logits)
    ours = Mask2FormerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(192, 256)] * 2)
    reference = Mask2FormerImageProcessorPil().post_process_semantic_segmentation(
        outputs, target_sizes=[(192, 256)] * 2
    )
    for mine, theirs in zip(ours, reference):
        assert (mine == theirs).float().mean() > 0.97


def test_bad_input_raises_value_errors():
    processor = Mask2FormerImageProcessor()
    outputs = _two_overlapping_queries()
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_panoptic_segmentation(outputs, target_sizes=[(10, 10), (10, 10)])
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(10, 10), (10, 10)])
    with pytest.raises(ValueError, match="masks_queries_logits"):
        processor.post_process_instance_segmentation(SimpleNamespace(class_queries_logits=torch.zeros(1, 2, 3)))
    with pytest.raises(ValueError, match="cannot both"):
        processor.post_process_instance_segmentation(outputs, return_binary_maps=True, return_coco_annotation=True)
    with pytest.raises(ValueError, match="pixel_mask"):
        processor.post_process_semantic_segmentation(outputs, pixel_mask=torch.ones(2, 128, 128))


def test_no_confident_query_gives_empty_results_on_the_outputs_device():
    processor = Mask2FormerImageProcessor()
    class_logits = torch.zeros(1, 4, 3)
    class_logits[..., -1] = 10
    outputs = _outputs(class_logits, torch.randn(1, 4, 8, 8))
    panoptic = processor.post_process_panoptic_segmentation(outputs, target_sizes=[(20, 30)])[0]
    assert panoptic["segments_info"] == [] and panoptic["segmentation"].shape == (20, 30)
    assert (panoptic["segmentation"] == 0).all()
    instance = processor.post_process_instance_segmentation(outputs, target_sizes=[(20, 30)])[0]
    assert instance["segments_info"] == [] and (instance["segmentation"] == -1).all()
