"""``mask2former demo``: train (through the training API), reload, score the held-out images, draw overlays."""

from __future__ import annotations

import json

from PIL import Image

from mask2former.commands import main
from mask2former.training.settings import load_recipe


def test_demo_trains_reloads_segments_and_writes_overlays_and_metrics(tmp_path):
    output_dir = tmp_path / "demo"
    arguments = ["--output-dir", str(output_dir), "--recipe", "tiny-test", "--max-steps", "2", "--num-processes", "1"]
    assert main(["demo", *arguments, "--num-overlays", "3"]) == 0
    summary = json.loads((output_dir / "demo_metrics.json").read_text())
    assert summary["stock_transformers_loads_cleanly"] is True
    assert summary["num_held_out_images"] == load_recipe("tiny-test")["dataset_options"]["num_eval_images"]
    assert set(summary["metrics"]) >= {"PQ", "SQ", "RQ"} and summary["max_steps"] == 2
    overlays = sorted((output_dir / "segmentations").glob("*.png"))
    assert len(overlays) == summary["num_overlays"] == 3
    with Image.open(overlays[0]) as overlay:  # prediction and ground truth side by side, 64 px images
        assert overlay.size == (64 * 2 + 4, 64)
