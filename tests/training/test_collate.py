"""Collation through the image processor: one binary mask per training segment, labels per image, padding marked."""

import numpy as np
import pytest
import torch

from mask2former.training.collate import SegmentationCollator, renumber_segments
from mask2former.training.data import load_dataset_for_segmentation


def _processors():
    from transformers import Mask2FormerImageProcessor as ReferenceProcessor

    from mask2former import Mask2FormerImageProcessor

    # ours takes ids as they are; transformers' needs an ignore_index to pad masks of different sizes
    return {
        "ours": Mask2FormerImageProcessor(do_resize=False),
        "transformers": ReferenceProcessor(do_resize=False, ignore_index=255),
    }


@pytest.fixture(params=["ours", "transformers"])
def processor(request):
    return _processors()[request.param]


@pytest.fixture
def sample(coco_sample_root):
    loaded = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic")
    return [loaded.dataset[0], loaded.dataset[1]], loaded.label_info


def _expected_targets(record, keep):
    """(label, mask bytes) of the segments kept, masks at the record's own resolution."""
    return sorted(
        (label, (record["segment_map"] == segment_id).tobytes())
        for segment_id, label, crowd in zip(record["segment_ids"], record["class_labels"], record["iscrowd"])
        if keep(label, crowd)
    )


def _batch_targets(batch, index, height, width):
    masks = batch["mask_labels"][index][:, :height, :width].bool().numpy()
    labels = batch["class_labels"][index].tolist()
    return sorted((label, mask.tobytes()) for label, mask in zip(labels, masks))


def test_panoptic_targets_are_the_non_crowd_segments(sample, processor):
    records, label_info = sample
    batch = SegmentationCollator(processor, "panoptic", label_info.thing_ids)(records)
    # padded to the larger image (ours also rounds up to a multiple of 32): pixel_mask marks the real pixels
    assert batch["pixel_values"].shape[:2] == (2, 3) and batch["pixel_values"].shape[2] >= 427
    assert batch["pixel_mask"][1, :360, :640].all() and not batch["pixel_mask"][1, 360:].any()
    assert batch["pixel_mask"][0, :427, :640].all() and not batch["pixel_mask"][0, 427:].any()
    for index, record in enumerate(records):
        height, width = record["segment_map"].shape
        expected = _expected_targets(record, lambda label, crowd: not crowd)
        assert _batch_targets(batch, index, height, width) == expected
        assert not batch["mask_labels"][index][:, height:].any()
        assert batch["class_labels"][index].dtype == torch.long


def test_instance_targets_are_things_only(sample, processor):
    records, label_info = sample
    things = set(label_info.thing_ids)
    batch = SegmentationCollator(processor, "instance", label_info.thing_ids)(records)
    for index, record in enumerate(records):
        height, width = record["segment_map"].shape
        expected = _expected_targets(record, lambda label, crowd: not crowd and label in things)
        assert _batch_targets(batch, index, height, width) == expected


def test_semantic_targets_merge_segments_of_a_class(sample, processor):
    records, _ = sample
    batch = SegmentationCollator(processor, "semantic")(records)
    record = records[1]
    height, width = record["segment_map"].shape
    expected = {}
    for segment_id, label, crowd in zip(record["segment_ids"], record["class_labels"], record["iscrowd"]):
        if not crowd:
            expected[label] = expected.get(label, np.zeros((height, width), bool)) | (
                record["segment_map"] == segment_id
            )
    expected = sorted((label, mask.tobytes()) for label, mask in expected.items())
    assert _batch_targets(batch, 1, height, width) == expected
    assert len(batch["class_labels"][1]) == len(set(batch["class_labels"][1].tolist()))


def test_image_without_segments_gives_no_masks(sample, processor):
    records, label_info = sample
    empty = {**records[1], "segment_map": np.zeros_like(records[1]["segment_map"])}
    empty.update(segment_ids=[], class_labels=[], iscrowd=[])
    batch = SegmentationCollator(processor, "panoptic", label_info.thing_ids)([records[0], empty])
    assert batch["mask_labels"][1].shape[0] == 0 and batch["class_labels"][1].numel() == 0
    assert batch["mask_labels"][0].shape[0] > 0


def test_keep_targets_and_model_inputs(sample):
    records, label_info = sample
    batch = SegmentationCollator(_processors()["ours"], "panoptic", label_info.thing_ids, keep_targets=True)(records)
    targets = batch.pop("targets")
    assert [target["image_id"] for target in targets] == ["142238", "439180"]
    assert torch.equal(targets[1]["segment_map"], torch.as_tensor(records[1]["segment_map"]))
    assert set(batch.keys()) == {"pixel_values", "pixel_mask", "mask_labels", "class_labels"}


def test_renumber_segments_handles_large_ids(sample):
    records, _ = sample
    renumbered, id_to_label = renumber_segments(records[0])
    # COCO ids up to 2^24 become 1..N; void and crowd become 0
    assert renumbered.max() == len(id_to_label) - 1 == sum(not crowd for crowd in records[0]["iscrowd"])
    crowd_id = records[0]["segment_ids"][records[0]["iscrowd"].index(True)]
    assert np.all(renumbered[records[0]["segment_map"] == crowd_id] == 0)
    with pytest.raises(ValueError, match="thing_ids"):
        renumber_segments(records[0], "instance")


def test_reduce_labels_processor_is_refused():
    from mask2former import Mask2FormerImageProcessor

    with pytest.raises(ValueError, match="do_reduce_labels"):
        SegmentationCollator(Mask2FormerImageProcessor(do_reduce_labels=True))


def test_skipped_examples_are_counted_across_dataloader_workers(tmp_path):
    """A bad example decoded in a worker reaches the main process as a reason in its batch (not a worker's global)."""
    from mask2former import Mask2FormerImageProcessor
    from mask2former.training.data import generate_synthetic_shapes

    root = generate_synthetic_shapes(tmp_path, seed=0, num_images=4, num_val_images=1, image_size=32)
    broken = sorted((root / "train2017").glob("*.png"))[3]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG: found only when decoded
    dataset = load_dataset_for_segmentation(root, "train", on_bad_input="skip").dataset
    collator = SegmentationCollator(Mask2FormerImageProcessor(do_resize=False), keep_targets=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator)
    batches = list(loader)
    reasons = [reason for batch in batches for reason in batch.get("skipped", [])]
    assert len(reasons) == 1 and broken.name in reasons[0]
    assert sum(len(batch["targets"]) for batch in batches) == 3
    assert "skipped" not in batches[0]  # only the batch that lost an example says so
