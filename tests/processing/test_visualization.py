"""The overlays colour what they are given, where they are given it, and keep the picture's size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.processing.visualization import (
    category_color,
    draw_instance_segmentation,
    draw_panoptic_segmentation,
    draw_semantic_segmentation,
)


def _grey_image(height: int = 120, width: int = 160) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), 100, dtype=np.uint8))


def _blend(color, alpha=0.55, grey=100):
    return np.round((1 - alpha) * grey + alpha * np.asarray(color, dtype=np.float64)).astype(np.uint8)


def test_semantic_colours_each_class_region_and_leaves_ignored_pixels():
    label_map = np.full((120, 160), 255)
    label_map[:, :80] = 3
    label_map[:60, 80:] = 7
    drawn = np.asarray(draw_semantic_segmentation(_grey_image(), torch.from_numpy(label_map), labelled=False))
    assert drawn.shape == (120, 160, 3)
    np.testing.assert_array_equal(drawn[100, 20], _blend(category_color(3)))
    np.testing.assert_array_equal(drawn[20, 140], _blend(category_color(7)))
    np.testing.assert_array_equal(drawn[110, 140], [100, 100, 100])  # ignored: untouched
    assert (drawn[100, 79] == 255).all() and (drawn[100, 80] == 255).all()  # outline on the class border


def test_labels_are_written_inside_their_region():
    label_map = np.zeros((120, 160), dtype=np.int64)
    label_map[:, 80:] = 1
    plain = np.asarray(draw_semantic_segmentation(_grey_image(), label_map, {0: "wall", 1: "sky"}, labelled=False))
    named = np.asarray(draw_semantic_segmentation(_grey_image(), label_map, {0: "wall", 1: "sky"}))
    changed_columns = np.nonzero((plain != named).any(axis=(0, 2)))[0]
    assert changed_columns.size > 0
    # two texts: one in each half, none crossing the border at column 80
    assert changed_columns.min() < 80 < changed_columns.max()
    assert not ((plain != named).any(axis=2)[:, 79:81]).any()


def test_instances_of_one_category_get_different_shades():
    assert category_color(1, 0) != category_color(1, 1) != category_color(1, 2)
    palette = {category_color(label_id) for label_id in range(133)}
    assert len(palette) == 133


def test_panoptic_draws_each_segment_in_its_category_colour():
    segment_map = np.zeros((120, 160), dtype=np.int64)
    segment_map[10:50, 10:60] = 5
    segment_map[60:110, 10:60] = 9
    segments_info = [{"id": 5, "label_id": 2, "score": 0.9}, {"id": 9, "label_id": 2, "score": 0.8}]
    drawn = np.asarray(draw_panoptic_segmentation(_grey_image(), segment_map, segments_info, labelled=False))
    np.testing.assert_array_equal(drawn[30, 20], _blend(category_color(2, 0)))
    np.testing.assert_array_equal(drawn[90, 20], _blend(category_color(2, 1)))
    np.testing.assert_array_equal(drawn[30, 120], [100, 100, 100])  # id 0: no segment


def test_overlapping_binary_maps_keep_both_outlines():
    maps = np.zeros((2, 120, 160), dtype=bool)
    maps[0, 10:90, 10:90] = True
    maps[1, 50:110, 50:150] = True
    info = [{"id": 1, "label_id": 0, "score": 0.9}, {"id": 2, "label_id": 4, "score": 0.7}]
    drawn = np.asarray(draw_instance_segmentation(_grey_image(), maps, info, labelled=False))
    assert (drawn[30, 9:11] == 255).any()  # left edge of the first instance
    assert (drawn[80, 149:151] == 255).any()  # right edge of the second
    np.testing.assert_array_equal(drawn[70, 70], _blend(category_color(4)))  # the later instance is on top


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="target_sizes"):
        draw_semantic_segmentation(_grey_image(), np.zeros((60, 80), dtype=np.int64))
    with pytest.raises(ValueError, match="len\\(segments_info\\)"):
        draw_instance_segmentation(_grey_image(), np.zeros((3, 120, 160), dtype=bool), [{"id": 1, "label_id": 0}])


def test_coco_ground_truth_through_the_panoptic_drawer(coco_sample_root, tmp_path):
    panoptic = json.loads((coco_sample_root / "annotations" / "panoptic_val2017.json").read_text())
    names = {category["id"]: category["name"] for category in panoptic["categories"]}
    for annotation in panoptic["annotations"]:
        image = Image.open(coco_sample_root / "val2017" / annotation["file_name"].replace(".png", ".jpg"))
        rgb = np.asarray(
            Image.open(coco_sample_root / "annotations" / "panoptic_val2017" / annotation["file_name"]), dtype=np.int64
        )
        segment_map = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        drawn = draw_panoptic_segmentation(image, segment_map, annotation["segments_info"], names)
        assert drawn.size == image.size
        drawn.save(tmp_path / f"{annotation['image_id']}.png")
        original, overlay = np.asarray(image.convert("RGB")), np.asarray(drawn)
        for segment in annotation["segments_info"]:
            # every annotated segment is visibly coloured
            changed = (original != overlay).any(axis=2)[segment_map == segment["id"]]
            assert changed.mean() > 0.9, segment
        # pixels without annotation are not coloured: they stay as they were or carry a white outline
        plain = np.asarray(draw_panoptic_segmentation(image, segment_map, annotation["segments_info"], labelled=False))
        unlabelled = segment_map == 0
        untouched_or_outline = (original == plain).all(axis=2) | (plain == 255).all(axis=2)
        assert untouched_or_outline[unlabelled].all()
