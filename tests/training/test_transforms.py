"""Augmentations move image and segment map together, drop emptied segments, keep empty images."""

import numpy as np
import pytest

from mask2former.training.transforms import (
    LargeScaleJitter,
    PhotometricDistortion,
    RandomHorizontalFlip,
    ShortSideScaleCrop,
    build_train_transform,
)

BLOCK = 16


def _grid_record(height=96, width=160):
    """A record whose image colour is a function of the segment: block (r, c) has id 1 + r*10 + c."""
    rows, cols = np.mgrid[0:height, 0:width] // BLOCK
    segment_map = (1 + rows * 10 + cols).astype(np.int64)
    image = np.stack([rows * 20 + 10, cols * 20 + 10, (rows + cols) * 7 % 255], axis=-1).astype(np.uint8)
    ids = np.unique(segment_map).tolist()
    return {
        "image": image,
        "segment_map": segment_map,
        "segment_ids": ids,
        "class_labels": [segment_id % 7 for segment_id in ids],
        "iscrowd": [False] * len(ids),
        "image_id": "grid",
    }


def _colour_of(segment_id):
    row, col = divmod(segment_id - 1, 10)
    return np.array([row * 20 + 10, col * 20 + 10, (row + col) * 7 % 255])


def _assert_aligned(record):
    """Away from block borders, each pixel's colour is its segment's colour: image and map moved together."""
    segment_map, image = record["segment_map"], record["image"].astype(int)
    uniform = np.ones(segment_map.shape, dtype=bool)
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            uniform &= np.roll(segment_map, (dy, dx), axis=(0, 1)) == segment_map
    uniform[:2], uniform[-2:], uniform[:, :2], uniform[:, -2:] = False, False, False, False
    ys, xs = np.nonzero(uniform)
    assert len(ys) > 0
    expected = np.stack([_colour_of(segment_id) for segment_id in segment_map[ys, xs]])
    assert np.abs(image[ys, xs] - expected).max() <= 2


def _assert_segments_consistent(record):
    present = set(np.unique(record["segment_map"]).tolist()) - {0}
    assert set(record["segment_ids"]) == present
    assert len(record["class_labels"]) == len(record["segment_ids"]) == len(record["iscrowd"])
    assert all(label == segment_id % 7 for segment_id, label in zip(record["segment_ids"], record["class_labels"]))


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_keeps_image_and_map_aligned(seed):
    transform = LargeScaleJitter(output_size=64, min_scale=0.5, max_scale=2.0, seed=seed)
    record = transform(_grid_record())
    assert record["image"].dtype == np.uint8 and record["image"].shape[:2] == record["segment_map"].shape
    assert max(record["segment_map"].shape) <= 64
    _assert_aligned(record)
    _assert_segments_consistent(record)


def test_large_scale_jitter_scale_and_crop_sizes():
    # scale fixed at 0.5: the 96x160 image must fit in 32x32 -> factor 0.2 -> 19x32, no crop needed
    small = LargeScaleJitter(output_size=64, min_scale=0.5, max_scale=0.5, flip_prob=0.0, seed=0)(_grid_record())
    assert small["segment_map"].shape == (19, 32)
    # scale 2.0: fit in 128x128 -> factor 0.8 -> 77x128, then a 64x64 crop
    large = LargeScaleJitter(output_size=64, min_scale=2.0, max_scale=2.0, flip_prob=0.0, seed=0)(_grid_record())
    assert large["segment_map"].shape == (64, 64)
    padded = LargeScaleJitter(output_size=64, min_scale=0.5, max_scale=0.5, pad=True, seed=0)(_grid_record())
    assert padded["image"].shape == (64, 64, 3) and np.all(padded["segment_map"][19:] == 0)
    assert np.all(padded["image"][19:] == 128)


def test_crops_drop_emptied_segments():
    dropped = kept = 0
    for seed in range(20):
        record = LargeScaleJitter(output_size=48, min_scale=1.5, max_scale=2.0, seed=seed)(_grid_record())
        _assert_segments_consistent(record)
        if 1 in record["segment_ids"]:
            kept += 1
        else:
            dropped += 1
    assert dropped > 0 and kept > 0  # the top-left block is sometimes cropped away, and then never listed


def test_images_without_segments_are_kept():
    record = _grid_record()
    record.update(segment_map=np.zeros_like(record["segment_map"]), segment_ids=[], class_labels=[], iscrowd=[])
    for transform in (LargeScaleJitter(output_size=64, seed=0), ShortSideScaleCrop(crop_size=64, seed=0)):
        out = transform(record)
        assert out["segment_ids"] == [] and out["image"].size > 0


def test_flip_mirrors_both():
    record = _grid_record()
    flipped = RandomHorizontalFlip(prob=1.0)(record)
    assert np.array_equal(flipped["image"], record["image"][:, ::-1])
    assert np.array_equal(flipped["segment_map"], record["segment_map"][:, ::-1])
    assert np.array_equal(RandomHorizontalFlip(prob=0.0)(record)["image"], record["image"])


@pytest.mark.parametrize("seed", range(4))
def test_ade20k_scale_crop(seed):
    transform = ShortSideScaleCrop(base_size=64, crop_size=48, photometric=False, seed=seed)
    # short side drawn from {32, 38, ..., 128}; the 96-pixel side is the short one
    assert transform.short_sides == [int(64 * step / 10) for step in range(5, 21)]
    record = transform(_grid_record())
    assert record["segment_map"].shape[0] <= 48 and record["segment_map"].shape[1] <= 48
    _assert_aligned(record)
    _assert_segments_consistent(record)


def test_ade20k_category_max_ratio():
    """Class 1 covers most of the image: with a 0.75 cap, crops are redrawn until a second class takes > 25 %."""
    segment_map = np.ones((100, 100), dtype=np.int64)
    segment_map[60:, 60:] = 2
    record = {
        "image": np.zeros((100, 100, 3), dtype=np.uint8),
        "segment_map": segment_map,
        "segment_ids": [1, 2],
        "class_labels": [0, 1],
        "iscrowd": [False, False],
    }

    def balanced(out):
        counts = np.bincount(out["segment_map"].ravel(), minlength=3)[1:]
        return counts.min() > 0 and counts.max() < 0.75 * counts.sum()

    def count_balanced(ratio):
        common = {"base_size": 100, "min_ratio": 1.0, "max_ratio": 1.0, "crop_size": 50, "photometric": False}
        outputs = [ShortSideScaleCrop(category_max_ratio=ratio, seed=s, **common)(record) for s in range(30)]
        return sum(balanced(out) for out in outputs)

    constrained, unconstrained = count_balanced(0.75), count_balanced(1.0)
    # one random crop is balanced ~1 time in 10 here; up to 10 redraws make it several times likelier
    assert constrained >= 2 * max(unconstrained, 1), (constrained, unconstrained)


def test_photometric_distortion_changes_only_the_image():
    record = _grid_record()
    out = PhotometricDistortion(seed=1)(record)
    assert np.array_equal(out["segment_map"], record["segment_map"])
    assert out["image"].dtype == np.uint8 and out["image"].shape == record["image"].shape
    changed = [not np.array_equal(PhotometricDistortion(seed=s)(record)["image"], record["image"]) for s in range(5)]
    assert any(changed)
    again = PhotometricDistortion(seed=1)(record)
    assert np.array_equal(again["image"], out["image"])


def test_build_train_transform():
    assert isinstance(build_train_transform("coco_lsj", output_size=32), LargeScaleJitter)
    assert isinstance(build_train_transform("ade20k"), ShortSideScaleCrop)
    assert build_train_transform("none") is None
    with pytest.raises(ValueError, match="coco_lsj"):
        build_train_transform("lsj")
