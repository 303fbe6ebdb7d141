"""The video Mask2Former folders of hub_configs/: the original's YouTube-VIS model zoo (2019 and 2021; R50, R101,
Swin-T/S/B/L), each the COCO-instance image model of its backbone with the release's 40 classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mask2former import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    VideoMask2FormerConfig,
    VideoMask2FormerForVideoSegmentation,
)
from mask2former.processing.video_processing_mask2former import VideoMask2FormerVideoProcessor

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"
VIDEO_FOLDERS = sorted(
    path.name for path in HUB_CONFIGS.glob("video-mask2former-*") if (path / "config.json").is_file()
)
BACKBONES = ("r50", "r101", "swin-tiny", "swin-small", "swin-base-IN21k", "swin-large-IN21k")
# spot checks of the two class lists (category id - 1 -> name), from the releases' category tables
YTVIS_SPOT_CHECKS = {
    "ytvis2019": {0: "person", 1: "giant_panda", 10: "hand", 25: "owl", 38: "earless_seal", 39: "tennis_racket"},
    "ytvis2021": {0: "airplane", 2: "bird", 13: "flying_disc", 25: "person", 31: "squirrel", 39: "zebra"},
}


def test_the_model_zoo_has_every_folder():
    expected = {f"video-mask2former-{backbone}-{dataset}" for backbone in BACKBONES for dataset in YTVIS_SPOT_CHECKS}
    assert set(VIDEO_FOLDERS) == expected


@pytest.mark.parametrize("folder", VIDEO_FOLDERS)
def test_folder_is_the_coco_instance_image_model_with_40_classes(folder):
    config = VideoMask2FormerConfig.from_pretrained(HUB_CONFIGS / folder)
    assert config.model_type == "video_mask2former" and config.use_temporal_position_embedding
    dataset = folder.rsplit("-", 1)[1]
    names = [config.id2label[index] for index in range(config.num_labels)]
    assert len(names) == 40 and len(set(names)) == 40
    assert {index: names[index] for index in YTVIS_SPOT_CHECKS[dataset]} == YTVIS_SPOT_CHECKS[dataset]
    backbone = folder.removeprefix("video-mask2former-").rsplit("-", 1)[0]
    image_folder = f"mask2former-{backbone.removesuffix('-IN21k') if 'large' in backbone else backbone}-coco-instance"
    image_config = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / image_folder)
    assert config.num_queries == image_config.num_queries == (200 if "large" in folder else 100)
    with torch.device("meta"):
        video = VideoMask2FormerForVideoSegmentation(config).state_dict()
        image = Mask2FormerForUniversalSegmentation(image_config).state_dict()
    # an image checkpoint initialises the video model: the same tensors, except the class head's 80 -> 40 classes
    resized = {"class_predictor.weight", "class_predictor.bias", "criterion.empty_weight"}
    assert set(video) == set(image)
    assert all(video[name].shape == image[name].shape for name in set(video) - resized)
    assert video["class_predictor.weight"].shape == (41, config.hidden_dim)


@pytest.mark.parametrize("folder", VIDEO_FOLDERS)
def test_video_processor_config_uses_the_original_test_size(folder):
    processor = VideoMask2FormerVideoProcessor.from_pretrained(HUB_CONFIGS / folder)
    # INPUT.MIN_SIZE_TEST: 360 for ResNets and the 2021 Swin-L, 480 for the other Swin models
    expected = 360 if folder.split("-")[2].startswith("r") or folder.endswith("large-IN21k-ytvis2021") else 480
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (expected, 1333)
    assert processor.size_divisor == 32 and processor.num_labels == 40
    raw = json.loads((HUB_CONFIGS / folder / "preprocessor_config.json").read_text())
    assert raw["image_processor_type"] == "VideoMask2FormerVideoProcessor"
