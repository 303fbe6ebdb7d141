"""Video processor: clips resized and padded alike, tubes encoded; video instance post-processing (top-k per clip,
per-frame masks at the original size, scores), frame-for-frame agreement with the image post-processing, and clip
overlays."""

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former import Mask2FormerImageProcessor
from mask2former.processing.video_processing_mask2former import VideoMask2FormerVideoProcessor
from mask2former.processing.video_visualization import clip_strip, draw_video_instances, save_clip_animation


def processor() -> VideoMask2FormerVideoProcessor:
    return VideoMask2FormerVideoProcessor(size={"shortest_edge": 64, "longest_edge": 128})


def random_clip(num_frames: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(num_frames)]


def test_every_frame_is_the_image_processors_frame_and_clips_pad_to_the_batch():
    clips = [random_clip(3, 48, 80, 0), random_clip(3, 96, 96, 1)]
    batch = processor()(clips, return_tensors="pt")
    assert batch["pixel_values_videos"].shape == (2, 3, 3, 64, 128)
    assert batch["pixel_mask"].shape == (2, 64, 128)
    image_processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    for index, clip in enumerate(clips):
        alone = image_processor(clip, return_tensors="pt")
        height, width = alone["pixel_values"].shape[-2:]
        assert torch.equal(batch["pixel_values_videos"][index, :, :, :height, :width], alone["pixel_values"])
        assert torch.equal(batch["pixel_mask"][index, :height, :width], alone["pixel_mask"][0])
        assert batch["pixel_mask"][index].sum() == alone["pixel_mask"][0].sum()  # no valid pixel outside


def test_a_single_clip_as_an_array_and_numpy_outputs():
    clip = np.stack(random_clip(2, 64, 64, 0))  # (T, H, W, 3)
    batch = processor()(clip)
    assert isinstance(batch["pixel_values_videos"], np.ndarray) and batch["pixel_values_videos"].shape == (
        1,
        2,
        3,
        64,
        64,
    )


def test_tubes_are_resized_like_their_frames_and_zero_in_the_padding():
    clip = random_clip(2, 32, 32, 0)
    tubes = np.zeros((1, 2, 32, 32), dtype=bool)
    tubes[0, 0, 8:16, 8:24] = True  # absent from frame 1
    batch = processor()([clip, random_clip(2, 64, 128, 1)], instance_masks=[tubes, np.zeros((0, 2, 64, 128))],
                        instance_classes=[[2], []], return_tensors="pt")  # fmt: skip
    masks = batch["mask_labels"][0]
    assert masks.shape == (1, 2, 64, 128) and batch["class_labels"][0].tolist() == [2]
    assert masks[0, 0, 16:32, 16:48].all() and masks[0, 0].sum() == 16 * 32  # scaled 2x
    assert masks[0, 1].sum() == 0 and masks[0, :, :, 64:].sum() == 0
    assert batch["mask_labels"][1].shape == (0, 2, 64, 128)


def test_bad_clips_are_clear_errors():
    with pytest.raises(ValueError, match="has 3 frames but videos\\[0\\] has 2"):
        processor()([random_clip(2, 32, 32, 0), random_clip(3, 32, 32, 1)])
    with pytest.raises(ValueError, match="share one size"):
        processor()([[*random_clip(1, 32, 32, 0), *random_clip(1, 32, 64, 1)]])
    with pytest.raises(ValueError, match="together"):
        processor()([random_clip(2, 32, 32, 0)], instance_masks=[np.zeros((0, 2, 32, 32))])


def tube_outputs(seed: int = 0, num_queries: int = 5, num_labels: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return {
        "class_queries_logits": torch.randn(2, num_queries, num_labels + 1, generator=generator) * 3,
        "masks_queries_logits": torch.randn(2, num_queries, 3, 16, 32, generator=generator) * 4,
    }


def test_top_k_pairs_per_clip_with_class_probability_scores():
    outputs = tube_outputs()
    results = processor().post_process_video_instance_segmentation(outputs, target_sizes=[(48, 80), (96, 96)], top_k=4)
    probabilities = outputs["class_queries_logits"].softmax(-1)[..., :-1]  # (B, Q, K)
    for index, result in enumerate(results):
        expected, _ = probabilities[index].flatten().topk(4)
        assert torch.allclose(result["scores"], expected)  # best first, the class probability (the original's)
        assert result["masks"].shape == (4, 3, *((48, 80), (96, 96))[index]) and result["masks"].dtype == torch.bool
        best_query = probabilities[index].flatten().argmax() // 3
        assert result["labels"][0] == probabilities[index].flatten().argmax() % 3
        assert result["masks"][0].any() == (outputs["masks_queries_logits"][index, best_query] > 0).any()


def test_each_frame_equals_the_image_post_processings_binary_maps():
    # one query, one class: the image post-processing of frame t gives the same mask at the same size
    outputs = tube_outputs(num_queries=1, num_labels=1)
    outputs["class_queries_logits"][..., 0] = 10.0
    video = processor()
    clip_masks = video.post_process_video_instance_segmentation(outputs, target_sizes=[(48, 80)] * 2, top_k=1)
    image = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    for frame in range(3):
        frame_outputs = {
            "class_queries_logits": outputs["class_queries_logits"],
            "masks_queries_logits": outputs["masks_queries_logits"][:, :, frame],
        }
        expected = image.post_process_instance_segmentation(
            frame_outputs, threshold=0.0, target_sizes=[(48, 80)] * 2, return_binary_maps=True,
            overlap_mask_area_threshold=0.0,
        )  # fmt: skip
        for index in range(2):
            assert torch.equal(clip_masks[index]["masks"][0, frame], expected[index]["segmentation"][0])


def test_mask_scores_and_rle_output():
    outputs = tube_outputs()
    video = processor()
    plain = video.post_process_video_instance_segmentation(outputs, target_sizes=[(32, 64)] * 2, top_k=6)
    scored = video.post_process_video_instance_segmentation(
        outputs, target_sizes=[(32, 64)] * 2, top_k=6, use_mask_scores=True
    )
    for before, after in zip(plain, scored):
        assert (after["scores"] <= before["scores"].max() + 1e-6).all()
        assert torch.all(after["scores"][:-1] >= after["scores"][1:])  # re-ordered by the new score
    rles = video.post_process_video_instance_segmentation(
        outputs, target_sizes=[(32, 64)] * 2, top_k=2, return_coco_annotation=True
    )
    from pycocotools import mask as mask_utils

    for result, dense in zip(rles, plain):
        assert len(result["segmentations"]) == 2 and len(result["segmentations"][0]) == 3
        decoded = mask_utils.decode(result["segmentations"][0][1]).astype(bool)
        assert np.array_equal(decoded, dense["masks"][0, 1].numpy())


def test_padded_clips_post_process_their_valid_region():
    # a 32x32 clip padded in a 64x128 batch: its masks come from the valid region only
    clips = [random_clip(2, 32, 32, 0), random_clip(2, 64, 128, 1)]
    video = processor()
    batch = video(clips, return_tensors="pt")
    outputs = {
        "class_queries_logits": torch.zeros(2, 1, 2),
        "masks_queries_logits": torch.full((2, 1, 2, 16, 32), -5.0),
    }
    outputs["class_queries_logits"][:, 0, 0] = 5.0
    outputs["masks_queries_logits"][0, 0, :, :16, :16] = 5.0  # the whole valid region of clip 0, nothing else
    result = video.post_process_video_instance_segmentation(outputs, target_sizes=[(32, 32), (64, 128)], top_k=1,
                                                            pixel_mask=batch["pixel_mask"])  # fmt: skip
    assert result[0]["masks"].shape == (1, 2, 32, 32) and result[0]["masks"].all()


def test_clip_overlays_keep_an_instance_colour_across_frames(tmp_path):
    frames = [Image.new("RGB", (40, 30), (50, 50, 50)) for _ in range(3)]
    masks = torch.zeros(2, 3, 30, 40, dtype=torch.bool)
    for t in range(3):
        masks[0, t, 5:15, 5 + 5 * t : 15 + 5 * t] = True
    masks[1, :, 20:28, 20:30] = True
    result = {"scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 0]), "masks": masks}
    overlays = draw_video_instances(frames, result, {0: "a", 1: "b"}, score_threshold=0.5, labelled=False)
    assert len(overlays) == 3
    colours = [np.asarray(overlay)[10, 10 + 5 * t] for t, overlay in enumerate(overlays)]
    assert all(np.array_equal(colour, colours[0]) for colour in colours) and not np.array_equal(colours[0], [50] * 3)
    assert np.array_equal(np.asarray(overlays[0])[24, 25], [50, 50, 50])  # below the score threshold: not drawn
    strip = clip_strip(overlays, gap=2)
    assert strip.size == (3 * 40 + 2 * 2, 30)
    path = save_clip_animation(overlays, tmp_path / "clip.gif", fps=4)
    with Image.open(path) as animation:
        assert animation.n_frames == 3
    with pytest.raises(ValueError, match="T = 2 frames, got shape \\(2, 3, 30, 40\\)"):
        draw_video_instances(frames[:2], result)
