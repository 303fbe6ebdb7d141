"""transformers' image-segmentation pipeline runs our model and processor for all three subtasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

TINY = Path(__file__).resolve().parents[2] / "hub_configs" / "tiny-swin-coco-panoptic"


@pytest.fixture(scope="module")
def segmenter(tiny_config):
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(tiny_config("swin")).eval()
    with torch.no_grad():  # confident class scores and unlikely "no object": a random model still returns segments
        model.class_predictor.weight.mul_(40.0)
        model.class_predictor.bias[-1] = -20.0
    processor = Mask2FormerImageProcessor.from_pretrained(TINY)
    return pipeline("image-segmentation", model=model, image_processor=processor)


@pytest.fixture
def coco_images(coco_sample_root):
    # the two real images at half size (320 pixels wide): same content, a quarter of the post-processing work
    images = [Image.open(path).convert("RGB") for path in sorted((coco_sample_root / "val2017").glob("*.jpg"))]
    return [image.resize((image.width // 2, image.height // 2)) for image in images]


@pytest.mark.parametrize("subtask", ["panoptic", "instance", "semantic"])
def test_pipeline_returns_labelled_binary_masks_of_the_input_size(segmenter, coco_images, subtask):
    labels = set(segmenter.model.config.id2label.values())
    results = segmenter(coco_images, subtask=subtask, threshold=0.1)
    assert len(results) == len(coco_images)
    for image, segments in zip(coco_images, results):
        assert len(segments) >= 1
        masks = []
        for segment in segments:
            assert set(segment) == {"score", "label", "mask"}
            assert segment["label"] in labels
            assert isinstance(segment["mask"], Image.Image) and segment["mask"].mode == "L"
            assert segment["mask"].size == image.size
            mask = np.asarray(segment["mask"])
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
            masks.append(mask > 0)
            if subtask == "semantic":
                assert segment["score"] is None
            else:
                assert 0.1 < segment["score"] <= 1.0
        coverage = np.sum(masks, axis=0)
        if subtask == "semantic":  # one mask per class present: they tile the image
            assert (coverage == 1).all()
        elif subtask == "panoptic":  # segments never overlap
            assert coverage.max() == 1


def test_pipeline_agrees_with_calling_model_and_processor(segmenter, coco_images):
    image = coco_images[0]
    processor, model = segmenter.image_processor, segmenter.model
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    expected = processor.post_process_panoptic_segmentation(
        outputs, threshold=0.1, overlap_mask_area_threshold=0.5, target_sizes=[image.size[::-1]]
    )[0]
    segments = segmenter(image, subtask="panoptic", threshold=0.1)
    assert len(segments) == len(expected["segments_info"])
    for segment, info in zip(segments, expected["segments_info"]):
        assert segment["label"] == model.config.id2label[info["label_id"]]
        assert segment["score"] == pytest.approx(info["score"], abs=1e-3)
        np.testing.assert_array_equal(
            np.asarray(segment["mask"]) > 0, (expected["segmentation"] == info["id"]).numpy()
        )
