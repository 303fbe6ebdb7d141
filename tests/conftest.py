"""Shared fixtures: offline hub, deterministic seeds, the real COCO sample beside the checkout, the tiny model."""

import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mask2former import Mask2FormerConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE_ROOT = REPO_ROOT.parent / "shared" / "data" / "coco-panoptic-sample"
TINY_CONFIG_DIRS = {
    backbone: REPO_ROOT / "hub_configs" / f"tiny-{backbone}-coco-panoptic" for backbone in ("swin", "resnet")
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def coco_sample_root() -> Path:
    """A COCO root (val2017/ + annotations/) with two real val2017 images and their panoptic annotations."""
    if not COCO_SAMPLE_ROOT.is_dir():
        pytest.fail(f"the shared COCO sample is missing at {COCO_SAMPLE_ROOT}; it ships beside the checkout")
    return COCO_SAMPLE_ROOT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_tiny_config(backbone: str = "swin", **overrides) -> Mask2FormerConfig:
    """The tiny Mask2Former of ``hub_configs/tiny-<backbone>-coco-panoptic`` (133 COCO classes), with overrides.

    ``num_labels=N`` (without ``id2label``) names the classes ``"class 0"`` .. ``"class N-1"``.
    """
    if backbone not in TINY_CONFIG_DIRS:
        raise ValueError(f"no tiny config for backbone {backbone!r}; use one of {sorted(TINY_CONFIG_DIRS)}")
    fields = json.loads((TINY_CONFIG_DIRS[backbone] / "config.json").read_text())
    if "num_labels" in overrides and "id2label" not in overrides:
        overrides["id2label"] = {index: f"class {index}" for index in range(overrides.pop("num_labels"))}
    if "id2label" in overrides:
        fields.pop("label2id", None)
        overrides.setdefault("label2id", {label: index for index, label in overrides["id2label"].items()})
    fields.update(overrides)
    return Mask2FormerConfig.from_dict(fields)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Mask2FormerConfig]:
    """``tiny_config(backbone="swin" | "resnet", **overrides) -> Mask2FormerConfig``: the one tiny test model."""
    return make_tiny_config
