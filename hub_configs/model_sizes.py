"""Print the parameter count of every hub_configs model next to the paper's model size.

``python hub_configs/model_sizes.py``: builds each architecture on the meta device (no memory, a few seconds).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

HUB_CONFIGS = Path(__file__).resolve().parent
# Mask2Former paper, tables 1-3 (millions of parameters)
PAPER_SIZES_M = {"r50": 44, "r101": 63, "swin-tiny": 47, "swin-small": 69, "swin-base": 107, "swin-large": 216}


def main() -> None:
    print(f"{'model':52s} {'params (M)':>10s} {'paper (M)':>9s} {'queries':>7s} {'classes':>7s}")
    for folder in sorted(HUB_CONFIGS.glob("mask2former-*")):
        config = Mask2FormerConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = Mask2FormerForUniversalSegmentation(config)
        parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e6
        backbone = re.match(r"mask2former-(r50|r101|swin-[a-z]+)", folder.name).group(1)
        print(f"{folder.name:52s} {parameters:10.2f} {PAPER_SIZES_M[backbone]:9d} {config.num_queries:7d} "
              f"{config.num_labels:7d}")  # fmt: skip


if __name__ == "__main__":
    main()
