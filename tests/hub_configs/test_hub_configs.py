"""Every folder of hub_configs/ builds the paper's architecture offline, with the dataset's class list.

Expected parameter counts are the paper's model sizes (Mask2Former, CVPR 2022, tables 1-3: R50 44M, R101 63M,
Swin-T 47M, Swin-S 69M, Swin-B 107M, Swin-L 216M with 200 queries); the class lists come from the COCO panoptic
categories file of the shared sample and, for the other datasets, from their published class definitions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"
# the video Mask2Former folders (video-*) have their own tests: test_video_hub_configs.py
FOLDERS = sorted(
    path.name
    for path in HUB_CONFIGS.iterdir()
    if (path / "config.json").is_file() and not path.name.startswith("video-")
)
MODEL_ZOO = [name for name in FOLDERS if name.startswith("mask2former-")]

# The facebook/mask2former-* checkpoints published on the Hub: each must have its folder.
PUBLISHED_ON_HUB = [
    *(f"mask2former-swin-{size}-coco-{task}" for size in ("tiny", "small", "base", "base-IN21k", "large")
      for task in ("panoptic", "instance")),
    *(f"mask2former-swin-{size}-ade-semantic" for size in ("tiny", "small", "base", "base-IN21k", "large")),
    "mask2former-swin-large-ade-panoptic",
    *(f"mask2former-swin-{size}-cityscapes-{task}" for size in ("tiny", "small", "base-IN21k", "large")
      for task in ("semantic", "instance", "panoptic")),
    "mask2former-swin-large-mapillary-vistas-semantic",
    "mask2former-swin-large-mapillary-vistas-panoptic",
]  # fmt: skip
PAPER_RESNET_VARIANTS = [
    f"mask2former-{depth}-coco-{task}" for depth in ("r50", "r101") for task in ("panoptic", "instance")
]

# Paper model sizes in millions of parameters (Swin-L's 216M is with 200 queries; 100 queries are 0.05M fewer).
PAPER_SIZES_M = {"r50": 44, "r101": 63, "swin-tiny": 47, "swin-small": 69, "swin-base": 107, "swin-large": 216}

CITYSCAPES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
# ADE20K (150 classes): spot checks spread over the list, from the SceneParsing objectInfo150 table.
ADE20K_SPOT_CHECKS = {0: "wall", 2: "sky", 12: "person", 20: "car", 36: "lamp", 56: "pool table",
                      89: "television receiver", 115: "bag", 138: "ashcan", 149: "flag"}  # fmt: skip
MAPILLARY_SPOT_CHECKS = {0: "Bird", 13: "Road", 19: "Person", 23: "Lane Marking - Crosswalk", 27: "Sky", 55: "Car",
                         64: "Ego Vehicle"}  # fmt: skip


def _backbone_name(folder: str) -> str:
    for name in ("r101", "r50", "swin-tiny", "swin-small", "swin-base", "swin-large"):
        if f"-{name}-" in folder:
            return name
    raise AssertionError(f"no known backbone in {folder}")


def _coco_names(coco_sample_root: Path, things_only: bool) -> list[str]:
    categories = json.loads((coco_sample_root / "annotations" / "panoptic_coco_categories.json").read_text())
    return [category["name"] for category in categories if category["isthing"] or not things_only]


def test_every_published_checkpoint_and_paper_variant_has_a_folder():
    missing = sorted(set(PUBLISHED_ON_HUB + PAPER_RESNET_VARIANTS) - set(FOLDERS))
    assert not missing, f"hub_configs lacks {missing}"


@pytest.mark.parametrize("folder", MODEL_ZOO)
def test_folder_builds_the_papers_model(folder):
    config = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder)
    assert config.model_type == "mask2former"
    # meta device: the architecture without allocating ~1 GB of weights per model
    with torch.device("meta"):
        model = Mask2FormerForUniversalSegmentation(config)
    num_parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    expected = PAPER_SIZES_M[_backbone_name(folder)]
    # the paper rounds to whole millions; the class head adds at most 0.04M over datasets
    assert abs(num_parameters - expected) < 0.6, f"{folder}: {num_parameters:.2f}M parameters, paper says {expected}M"
    instance_level = any(task in folder for task in ("panoptic", "instance"))
    assert config.num_queries == (200 if "swin-large" in folder and instance_level else 100)
    assert model.class_predictor.out_features == config.num_labels + 1  # + "no object"


@pytest.mark.parametrize("folder", FOLDERS)
def test_transformers_reads_the_same_config(folder):
    # the folders are meant to be interchangeable with the Hub's: stock transformers must see the same architecture
    import transformers

    ours = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder).to_dict()
    theirs = transformers.Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder).to_dict()
    for key in ("backbone_config", "num_queries", "hidden_dim", "decoder_layers", "encoder_layers", "id2label",
                "class_weight", "mask_weight", "dice_weight", "no_object_weight", "train_num_points"):  # fmt: skip
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("folder", MODEL_ZOO)
def test_label_maps_are_the_datasets_class_lists(folder, coco_sample_root):
    config = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder)
    names = [config.id2label[index] for index in range(config.num_labels)]
    assert config.label2id == {name: index for index, name in enumerate(names)}
    if "coco-panoptic" in folder:
        assert names == _coco_names(coco_sample_root, things_only=False)
    elif "coco-instance" in folder:
        assert names == _coco_names(coco_sample_root, things_only=True)
    elif "cityscapes-instance" in folder:
        assert names == CITYSCAPES[11:]
    elif "cityscapes" in folder:
        assert names == CITYSCAPES
    elif "-ade-" in folder:
        assert len(names) == 150 and len(set(names)) == 150
        assert {index: names[index] for index in ADE20K_SPOT_CHECKS} == ADE20K_SPOT_CHECKS
    elif "mapillary-vistas" in folder:
        assert len(names) == 65 and len(set(names)) == 65
        assert {index: names[index] for index in MAPILLARY_SPOT_CHECKS} == MAPILLARY_SPOT_CHECKS
    else:
        raise AssertionError(f"no class list known for {folder}")


@pytest.mark.parametrize("folder", FOLDERS)
def test_preprocessor_config_loads_and_agrees_with_the_model(folder):
    config = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder)
    processor = Mask2FormerImageProcessor.from_pretrained(HUB_CONFIGS / folder)
    assert processor.num_labels == config.num_labels
    assert processor.size_divisor == 32  # the pixel decoder needs inputs divisible by the largest stride
    assert processor.ignore_index == config.ignore_value == (65 if "mapillary" in folder else 255)
    # ImageNet statistics, and an aspect-preserving resize (shortest edge) as the published processors do
    np.testing.assert_allclose(processor.image_mean, [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(processor.image_std, [0.229, 0.224, 0.225], rtol=1e-6)
    expected_edge = 128 if folder.startswith("tiny-") else 384
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (expected_edge, 1333)


@pytest.mark.parametrize("folder", [name for name in FOLDERS if name.startswith("tiny-")])
def test_tiny_configs_run_a_forward_pass(folder):
    config = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 64, 96))
    assert outputs.class_queries_logits.shape == (1, config.num_queries, config.num_labels + 1)
    assert outputs.masks_queries_logits.shape == (1, config.num_queries, 16, 24)
    assert torch.isfinite(outputs.masks_queries_logits).all()
