"""convert-detectron2 with a video variant: the original video checkpoints carry the image model's names, so the same
rules convert them, and the output folder is a video Mask2Former (model_type video_mask2former)."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict

import torch

from mask2former import VideoMask2FormerConfig, VideoMask2FormerForVideoSegmentation
from mask2former.commands import main as cli_main
from mask2former.commands.convert_detectron2 import rename_to_original


def test_a_video_checkpoint_converts_to_a_strictly_loading_video_model(tmp_path, tiny_config):
    fields = tiny_config(num_labels=40).to_dict()
    fields.update(model_type="video_mask2former", architectures=["VideoMask2FormerForVideoSegmentation"])
    variant = tmp_path / "video-variant"
    VideoMask2FormerConfig.from_dict(fields).save_pretrained(variant)
    model = VideoMask2FormerForVideoSegmentation(VideoMask2FormerConfig.from_pretrained(variant)).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    original = rename_to_original({name: tensor.numpy() for name, tensor in model.state_dict().items()})
    assert "sem_seg_head.predictor.query_feat.weight" in original  # the original's names
    with open(tmp_path / "model_final.pkl", "wb") as file:
        pickle.dump({"model": OrderedDict(original)}, file)

    assert cli_main(["convert-detectron2", str(tmp_path / "model_final.pkl"), "--variant", str(variant),
                     str(tmp_path / "out")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "video_mask2former"
    converted, info = VideoMask2FormerForVideoSegmentation.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    clip = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model(pixel_values_videos=clip), converted.eval()(pixel_values_videos=clip)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits)
    torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits)
