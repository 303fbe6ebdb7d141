"""Shared fixtures: offline hub, deterministic seeds, the real COCO sample beside the checkout."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE_ROOT = REPO_ROOT.parent / "shared" / "data" / "coco-panoptic-sample"


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
