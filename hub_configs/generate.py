"""Write one folder per published Mask2Former checkpoint (``config.json`` + ``preprocessor_config.json``).

The folders are committed; this script is how they were made and how to remake them
(``python hub_configs/generate.py``). Nothing is downloaded: the architectures follow the original repository's
configs (backbone sizes, window sizes, 100 or 200 queries), the label maps the datasets' class lists.

Hub names follow ``facebook/mask2former-<backbone>-<dataset>-<task>``; the paper's ResNet variants, which the Hub does
not carry, are named the same way (``mask2former-r50-coco-panoptic``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HUB_CONFIGS = Path(__file__).resolve().parent
COCO_CATEGORIES = HUB_CONFIGS.parent.parent / "shared" / "data" / "coco-panoptic-sample" / "annotations"

# ---- class lists ------------------------------------------------------------------------------------------------

# ADE20K SceneParsing (150 classes) as the published semantic checkpoints name them (trailing space of "bed " kept).
ADE20K_SEMANTIC_CLASSES = (
    "wall|building|sky|floor|tree|ceiling|road|bed |windowpane|grass|cabinet|sidewalk|person|earth|door|table|"
    "mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|armchair|seat|fence|desk|"
    "rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|signboard|chest of drawers|counter|sand|sink|"
    "skyscraper|fireplace|refrigerator|grandstand|path|stairs|runway|case|pool table|pillow|screen door|stairway|"
    "river|bridge|bookcase|blind|coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|kitchen island|"
    "computer|swivel chair|boat|bar|arcade machine|hovel|bus|towel|light|truck|tower|chandelier|awning|streetlight|"
    "booth|television receiver|airplane|dirt track|apparel|pole|land|bannister|escalator|ottoman|bottle|buffet|"
    "poster|stage|van|ship|fountain|conveyer belt|canopy|washer|plaything|swimming pool|stool|barrel|basket|"
    "waterfall|tent|bag|minibike|cradle|oven|ball|food|step|tank|trade name|microwave|pot|animal|bicycle|lake|"
    "dishwasher|screen|blanket|sculpture|hood|sconce|vase|traffic light|tray|ashcan|fan|pier|crt screen|plate|"
    "monitor|bulletin board|shower|radiator|glass|clock|flag"
).split("|")

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
# Cityscapes instance segmentation predicts only the 8 "thing" classes.
CITYSCAPES_THING_CLASSES = CITYSCAPES_CLASSES[11:]

# Mapillary Vistas v1.2, the 65 evaluated classes (readable names).
MAPILLARY_VISTAS_CLASSES = (
    "Bird|Ground Animal|Curb|Fence|Guard Rail|Barrier|Wall|Bike Lane|Crosswalk - Plain|Curb Cut|Parking|"
    "Pedestrian Area|Rail Track|Road|Service Lane|Sidewalk|Bridge|Building|Tunnel|Person|Bicyclist|Motorcyclist|"
    "Other Rider|Lane Marking - Crosswalk|Lane Marking - General|Mountain|Sand|Sky|Snow|Terrain|Vegetation|Water|"
    "Banner|Bench|Bike Rack|Billboard|Catch Basin|CCTV Camera|Fire Hydrant|Junction Box|Mailbox|Manhole|"
    "Phone Booth|Pothole|Street Light|Pole|Traffic Sign Frame|Utility Pole|Traffic Light|Traffic Sign (Back)|"
    "Traffic Sign (Front)|Trash Can|Bicycle|Boat|Bus|Car|Caravan|Motorcycle|On Rails|Other Vehicle|Trailer|Truck|"
    "Wheeled Slow|Car Mount|Ego Vehicle"
).split("|")


def coco_classes(things_only: bool) -> list[str]:
    """COCO panoptic's 133 categories (80 things then 53 stuff) in the order of their ids, or its 80 things."""
    categories = json.loads((COCO_CATEGORIES / "panoptic_coco_categories.json").read_text())
    return [category["name"] for category in categories if category["isthing"] or not things_only]


# ---- architectures ----------------------------------------------------------------------------------------------

SWIN = {
    # name: (embed_dim, depths, num_heads, window_size, pretraining image size)
    "swin-tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224),
    "swin-small": (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224),
    "swin-base": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
    "swin-base-IN21k": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384),
    "swin-large": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384),
}
RESNET_DEPTHS = {"r50": [3, 4, 6, 3], "r101": [3, 4, 23, 3]}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def swin_backbone(name: str) -> dict:
    embed_dim, depths, num_heads, window_size, image_size = SWIN[name]
    return {
        "model_type": "swin",
        "image_size": image_size,
        "patch_size": 4,
        "num_channels": 3,
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": num_heads,
        "window_size": window_size,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "use_absolute_embeddings": False,
        "drop_path_rate": 0.3,
        "hidden_size": embed_dim * 8,
        "out_features": STAGES,
        "out_indices": [1, 2, 3, 4],
    }


def resnet_backbone(name: str) -> dict:
    # The original repository starts from torchvision's ResNets: stride in the 3x3 conv (``STRIDE_IN_1X1: False``),
    # which is transformers' ``downsample_in_bottleneck=False``.
    return {
        "model_type": "resnet",
        "num_channels": 3,
        "embedding_size": 64,
        "hidden_sizes": [256, 512, 1024, 2048],
        "depths": RESNET_DEPTHS[name],
        "layer_type": "bottleneck",
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
        "out_features": STAGES,
        "out_indices": [1, 2, 3, 4],
    }


# ---- the model zoo ----------------------------------------------------------------------------------------------

DATASETS = {
    # dataset-task: its class names, in the order of the model's label ids
    "coco-panoptic": (lambda: coco_classes(things_only=False)),
    "coco-instance": (lambda: coco_classes(things_only=True)),
    "ade-semantic": (lambda: ADE20K_SEMANTIC_CLASSES),
    "ade-panoptic": (lambda: ADE20K_SEMANTIC_CLASSES),
    "cityscapes-semantic": (lambda: CITYSCAPES_CLASSES),
    "cityscapes-instance": (lambda: CITYSCAPES_THING_CLASSES),
    "cityscapes-panoptic": (lambda: CITYSCAPES_CLASSES),
    "mapillary-vistas-semantic": (lambda: MAPILLARY_VISTAS_CLASSES),
    "mapillary-vistas-panoptic": (lambda: MAPILLARY_VISTAS_CLASSES),
}

# The Hub's facebook/mask2former-* checkpoints.
PUBLISHED = {
    "coco-panoptic": ["swin-tiny", "swin-small", "swin-base", "swin-base-IN21k", "swin-large"],
    "coco-instance": ["swin-tiny", "swin-small", "swin-base", "swin-base-IN21k", "swin-large"],
    "ade-semantic": ["swin-tiny", "swin-small", "swin-base", "swin-base-IN21k", "swin-large"],
    "ade-panoptic": ["swin-large"],
    "cityscapes-semantic": ["swin-tiny", "swin-small", "swin-base-IN21k", "swin-large"],
    "cityscapes-instance": ["swin-tiny", "swin-small", "swin-base-IN21k", "swin-large"],
    "cityscapes-panoptic": ["swin-tiny", "swin-small", "swin-base-IN21k", "swin-large"],
    "mapillary-vistas-semantic": ["swin-large"],
    "mapillary-vistas-panoptic": ["swin-large"],
}
# The paper's ResNet variants (not on the Hub).
RESNET_VARIANTS = {
    "coco-panoptic": ["r50", "r101"],
    "coco-instance": ["r50", "r101"],
    "ade-semantic": ["r50", "r101"],
    "cityscapes-semantic": ["r50", "r101"],
    "cityscapes-instance": ["r50", "r101"],
    "cityscapes-panoptic": ["r50", "r101"],
}
# Swin-L uses 200 queries for instance-level tasks (panoptic, instance); every other model 100.
TWO_HUNDRED_QUERIES = {"coco-panoptic", "coco-instance", "ade-panoptic", "cityscapes-instance", "cityscapes-panoptic",
                       "mapillary-vistas-panoptic"}  # fmt: skip


def ignore_label(dataset: str) -> int:
    # detectron2's dataset metadata: Mapillary Vistas ignores label 65 (its "unlabeled"), the others 255
    return 65 if dataset.startswith("mapillary-vistas") else 255


def model_config(backbone: str, dataset: str) -> dict:
    classes = DATASETS[dataset]()
    num_queries = 200 if backbone == "swin-large" and dataset in TWO_HUNDRED_QUERIES else 100
    backbone_config = swin_backbone(backbone) if backbone.startswith("swin") else resnet_backbone(backbone)
    return {
        "architectures": ["Mask2FormerForUniversalSegmentation"],
        "model_type": "mask2former",
        "backbone_config": backbone_config,
        "feature_size": 256,
        "mask_feature_size": 256,
        "hidden_dim": 256,
        "encoder_feedforward_dim": 1024,
        "activation_function": "relu",
        "encoder_layers": 6,
        "decoder_layers": 10,
        "num_attention_heads": 8,
        "dropout": 0.0,
        "dim_feedforward": 2048,
        "pre_norm": False,
        "enforce_input_projection": False,
        "common_stride": 4,
        "ignore_value": ignore_label(dataset),
        "num_queries": num_queries,
        "no_object_weight": 0.1,
        "class_weight": 2.0,
        "mask_weight": 5.0,
        "dice_weight": 5.0,
        "train_num_points": 12544,
        "oversample_ratio": 3.0,
        "importance_sample_ratio": 0.75,
        "init_std": 0.02,
        "init_xavier_std": 1.0,
        "use_auxiliary_loss": True,
        "feature_strides": [4, 8, 16, 32],
        "id2label": {str(index): name for index, name in enumerate(classes)},
        "label2id": {name: index for index, name in enumerate(classes)},
    }


# The original configs' PIXEL_MEAN / PIXEL_STD (0-255), divided by 255 in float32 as the published files carry them.
PIXEL_MEAN = (np.array([123.675, 116.280, 103.530], dtype=np.float32) / np.float32(255)).tolist()
PIXEL_STD = (np.array([58.395, 57.120, 57.375], dtype=np.float32) / np.float32(255)).tolist()


def preprocessor_config(num_labels: int, ignore_index: int = 255, shortest_edge: int = 384) -> dict:
    # The published processors resize the shortest edge to 384 (longest at most 1333) and pad to multiples of 32.
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": shortest_edge, "longest_edge": 1333},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": PIXEL_MEAN,
        "image_std": PIXEL_STD,
        "size_divisor": 32,
        "ignore_index": ignore_index,
        "do_reduce_labels": False,
        "num_labels": num_labels,
    }


def tiny_config(dataset: str, backbone: str) -> dict:
    """A few-hundred-kilobyte model of the same layout, for tests."""
    config = model_config("swin-tiny" if backbone == "swin" else "r50", dataset)
    if backbone == "swin":
        config["backbone_config"].update(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                         hidden_size=128, drop_path_rate=0.0)  # fmt: skip
    else:
        config["backbone_config"].update(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    config.update(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
                  encoder_layers=1, decoder_layers=3, num_attention_heads=2, dim_feedforward=64, num_queries=10,
                  train_num_points=64)  # fmt: skip
    return config


# ---- video Mask2Former (Cheng et al., 2021): the original's model zoo, YouTube-VIS 2019 and 2021 ------------------

# The 40 classes of each release in the order of their category ids 1-40 (the releases' own category lists).
YTVIS_CLASSES = {
    "ytvis2019": (
        "person|giant_panda|lizard|parrot|skateboard|sedan|ape|dog|snake|monkey|hand|rabbit|duck|cat|cow|fish|train|"
        "horse|turtle|bear|motorbike|giraffe|leopard|fox|deer|owl|surfboard|airplane|truck|zebra|tiger|elephant|"
        "snowboard|boat|shark|mouse|frog|eagle|earless_seal|tennis_racket"
    ).split("|"),
    "ytvis2021": (
        "airplane|bear|bird|boat|car|cat|cow|deer|dog|duck|earless_seal|elephant|fish|flying_disc|fox|frog|"
        "giant_panda|giraffe|horse|leopard|lizard|monkey|motorbike|mouse|parrot|person|rabbit|shark|skateboard|snake|"
        "snowboard|squirrel|surfboard|tennis_racket|tiger|train|truck|turtle|whale|zebra"
    ).split("|"),
}
VIDEO_BACKBONES = ["r50", "r101", "swin-tiny", "swin-small", "swin-base-IN21k", "swin-large-IN21k"]


def video_test_size(backbone: str, dataset: str) -> int:
    # INPUT.MIN_SIZE_TEST of the original configs: 360 for ResNets, 480 for Swin; the 2021 Swin-L config comments
    # its 480 out ("OOM when using a larger test size") and keeps the base's 360.
    if backbone.startswith("r") or (backbone == "swin-large-IN21k" and dataset == "ytvis2021"):
        return 360
    return 480


def video_model_config(backbone: str, dataset: str) -> dict:
    """The image model of the same backbone with the release's 40 classes (Swin-L: 200 queries, as its COCO model)."""
    image_backbone = backbone.removesuffix("-IN21k") if backbone == "swin-large-IN21k" else backbone
    config = model_config(image_backbone, "coco-instance")
    classes = YTVIS_CLASSES[dataset]
    config.update(
        architectures=["VideoMask2FormerForVideoSegmentation"],
        model_type="video_mask2former",
        use_temporal_position_embedding=True,
        id2label={str(index): name for index, name in enumerate(classes)},
        label2id={name: index for index, name in enumerate(classes)},
    )
    return config


def video_preprocessor_config(backbone: str, dataset: str) -> dict:
    preprocessor = preprocessor_config(40, shortest_edge=video_test_size(backbone, dataset))
    preprocessor["image_processor_type"] = "VideoMask2FormerVideoProcessor"
    return preprocessor


def all_configs() -> dict[str, tuple[dict, dict]]:
    """Folder name -> (config.json, preprocessor_config.json)."""
    folders = {}
    for dataset, backbones in PUBLISHED.items():
        for backbone in backbones:
            config = model_config(backbone, dataset)
            preprocessor = preprocessor_config(len(config["id2label"]), config["ignore_value"])
            folders[f"mask2former-{backbone}-{dataset}"] = (config, preprocessor)
    for dataset, backbones in RESNET_VARIANTS.items():
        for backbone in backbones:
            config = model_config(backbone, dataset)
            preprocessor = preprocessor_config(len(config["id2label"]), config["ignore_value"])
            folders[f"mask2former-{backbone}-{dataset}"] = (config, preprocessor)
    for backbone in ("swin", "resnet"):
        config = tiny_config("coco-panoptic", backbone)
        # small inputs too, so that tests through the processor stay fast
        folders[f"tiny-{backbone}-coco-panoptic"] = (config, preprocessor_config(133, shortest_edge=128))
    for dataset in YTVIS_CLASSES:
        for backbone in VIDEO_BACKBONES:
            folders[f"video-mask2former-{backbone}-{dataset}"] = (
                video_model_config(backbone, dataset),
                video_preprocessor_config(backbone, dataset),
            )
    return folders


def main() -> None:
    for name, (config, preprocessor) in all_configs().items():
        folder = HUB_CONFIGS / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        print(name)


if __name__ == "__main__":
    main()
