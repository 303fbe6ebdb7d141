"""Windowed inference: windows stitched by mask overlap; one window equals the whole-clip model; segment-video."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former import VideoMask2FormerConfig, VideoMask2FormerForVideoSegmentation
from mask2former.processing.video_processing_mask2former import VideoMask2FormerVideoProcessor
from mask2former.processing.video_windows import windowed_video_outputs


class ShufflingModel:
    """Returns fixed tubes for the frames asked, with the queries in a different random order in every call."""

    def __init__(self, tubes: torch.Tensor, class_logits: torch.Tensor) -> None:
        self.tubes, self.class_logits, self.calls = tubes, class_logits, 0

    def __call__(self, pixel_values_videos: torch.Tensor, pixel_mask=None):
        # the clip's frames carry their index in pixel (0, 0, 0)
        frames = pixel_values_videos[0, :, 0, 0, 0].long()
        order = torch.randperm(self.tubes.shape[0], generator=torch.Generator().manual_seed(self.calls))
        self.calls += 1
        return SimpleNamespace(
            class_queries_logits=self.class_logits[order][None],
            masks_queries_logits=self.tubes[order][:, frames][None],
        )


def test_windows_are_stitched_back_into_the_whole_videos_tubes():
    num_queries, num_frames = 4, 11
    tubes = torch.full((num_queries, num_frames, 8, 8), -6.0)
    for query in range(num_queries):  # each query a square moving one pixel per frame, in its own row band
        for frame in range(num_frames):
            left = frame % 6
            tubes[query, frame, 2 * query : 2 * query + 2, left : left + 2] = 6.0
    class_logits = torch.randn(num_queries, 3)
    video = torch.arange(num_frames).float()[:, None, None, None].expand(-1, 3, 32, 32).clone()
    model = ShufflingModel(tubes, class_logits)
    stitched = windowed_video_outputs(model, video, window=4, overlap=1)
    assert model.calls == 4  # frames 0-3, 3-6, 6-9, 9-10
    # the first window fixes the slots; every later window was shuffled and matched back
    first_order = torch.randperm(num_queries, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stitched["masks_queries_logits"][0], tubes[first_order])
    torch.testing.assert_close(stitched["class_queries_logits"][0].softmax(-1), class_logits[first_order].softmax(-1))


def test_one_window_is_the_whole_clip_model(tiny_config):
    fields = tiny_config(decoder_layers=4, num_queries=6, num_labels=3).to_dict()
    fields["model_type"] = "video_mask2former"
    model = VideoMask2FormerForVideoSegmentation(VideoMask2FormerConfig.from_dict(fields)).eval()
    clip = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        whole = model(pixel_values_videos=clip)
    windowed = windowed_video_outputs(model, clip, window=3, overlap=1)
    assert torch.equal(windowed["masks_queries_logits"], whole.masks_queries_logits)
    torch.testing.assert_close(windowed["class_queries_logits"].softmax(-1), whole.class_queries_logits.softmax(-1))
    with pytest.raises(ValueError, match="0 <= overlap < window"):
        windowed_video_outputs(model, clip, window=2, overlap=2)


def test_segment_video_writes_overlays_and_a_results_json(tmp_path, tiny_config):
    from mask2former.commands import main as cli_main

    fields = tiny_config(decoder_layers=4, num_queries=6, num_labels=3).to_dict()
    fields["model_type"] = "video_mask2former"
    model_dir = tmp_path / "model"
    VideoMask2FormerForVideoSegmentation(VideoMask2FormerConfig.from_dict(fields)).save_pretrained(model_dir)
    VideoMask2FormerVideoProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(model_dir)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8)).save(frames_dir / f"{index:03d}.jpg")
    output = tmp_path / "out"
    arguments = ["segment-video", str(frames_dir), "--model", str(model_dir), "--output-dir", str(output)]
    assert cli_main([*arguments, "--window", "3", "--top-k", "4", "--threshold", "0", "--gif"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert len(results) == 4 and all(len(result["segmentations"]) == 5 for result in results)
    assert all(1 <= result["category_id"] <= 3 for result in results)
    assert sorted(path.name for path in output.glob("0*.png")) == [f"{index:05d}.png" for index in range(5)]
    assert Image.open(output / "00000.png").size == (72, 48)
    with Image.open(output / "overlay.gif") as animation:
        assert animation.n_frames == 5
    assert cli_main(["segment-video", str(tmp_path / "missing"), "--model", str(model_dir)]) == 1
