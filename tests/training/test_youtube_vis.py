"""The YouTube-VIS / OVIS reader on small jsons written here, the original's clip sampling, clip transforms, the
collator, and the generated synthetic-moving-shapes set read through the same reader."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mask2former.processing.video_processing_mask2former import VideoMask2FormerVideoProcessor
from mask2former.training.data.synthetic_videos import generate_synthetic_moving_shapes
from mask2former.training.data.video_transforms import ClipFlip, ClipResizeShortestEdge
from mask2former.training.data.youtube_vis import (
    VideoClipDataset,
    load_video_dataset,
    sample_training_frames,
)
from mask2former.training.video_collate import VideoClipCollator

HEIGHT, WIDTH, LENGTH = 24, 32, 4


def compressed_rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def box(top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def write_ytvis_root(root, layout: str = "2019"):
    """Two videos; instance 11 (category 7) present in frames 0-2 as compressed RLE / uncompressed RLE / polygons,
    null in frame 3; instance 12 (category 3) only in frame 3; a crowd instance 13."""
    if layout == "ovis":
        annotation_file, frames_root = root / "annotations" / "annotations_train.json", root / "train"
    else:
        annotation_file, frames_root = root / "train.json", root / "train" / "JPEGImages"
    videos = []
    for video_id in (1, 2):
        names = []
        for frame in range(LENGTH):
            name = f"v{video_id}/{frame:05d}.jpg"
            (frames_root / f"v{video_id}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((HEIGHT, WIDTH, 3), 40 * frame + video_id, dtype=np.uint8)).save(
                frames_root / name
            )
            names.append(name)
        videos.append({"id": video_id, "height": HEIGHT, "width": WIDTH, "length": LENGTH, "file_names": names})
    polygon = [[4.0, 2.0, 12.0, 2.0, 12.0, 10.0, 4.0, 10.0]]  # x, y of the box rows 2-9, cols 4-11
    annotations = [
        {
            "id": 11,
            "video_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "segmentations": [compressed_rle(box(2, 4, 8, 8)), uncompressed_rle(box(3, 5, 8, 8)), polygon, None],
        },
        {
            "id": 12,
            "video_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "segmentations": [None, None, None, compressed_rle(box(10, 10, 5, 5))],
        },
        {
            "id": 13,
            "video_id": 2,
            "category_id": 3,
            "iscrowd": 1,
            "segmentations": [compressed_rle(box(0, 0, 4, 4))] * LENGTH,
        },
    ]
    payload = {
        "videos": videos,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": annotations,
    }
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(payload))
    return annotation_file


@pytest.mark.parametrize("layout", ["2019", "ovis"])
def test_reader_gives_rows_labels_and_frame_paths(tmp_path, layout):
    write_ytvis_root(tmp_path, layout)
    data = load_video_dataset(tmp_path, "train")
    assert data.label_info.id2label == {0: "cat", 1: "dog"}
    assert data.label_info.category_ids == {0: 3, 1: 7}
    assert len(data.dataset) == 2
    row = data.dataset[0]
    assert row["video_id"] == 1 and len(row["file_names"]) == LENGTH
    assert all(Image.open(name).size == (WIDTH, HEIGHT) for name in row["file_names"])
    assert [instance["label"] for instance in row["instances"]] == [1, 0]
    assert row["instances"][0]["segmentations"][3] == ""  # the null frame


def test_whole_video_clips_decode_every_format_and_null_frames(tmp_path):
    write_ytvis_root(tmp_path)
    clips = VideoClipDataset(load_video_dataset(tmp_path, "train"), num_frames=None, training=False)
    clip = clips[0]
    assert clip["frame_indices"] == [0, 1, 2, 3]
    assert len(clip["frames"]) == LENGTH and clip["frames"][2].shape == (HEIGHT, WIDTH, 3)
    assert clip["instance_ids"] == [11, 12] and clip["class_labels"] == [1, 0]
    masks = clip["masks"]  # (N, T, H, W)
    assert masks.shape == (2, LENGTH, HEIGHT, WIDTH)
    assert np.array_equal(masks[0, 0], box(2, 4, 8, 8))
    assert np.array_equal(masks[0, 1], box(3, 5, 8, 8))
    assert abs(int(masks[0, 2].sum()) - 64) <= 16 and masks[0, 2, 5, 8]  # the polygon, rasterised
    assert not masks[0, 3].any() and masks[1, 3].sum() == 25 and not masks[1, :3].any()
    # the crowd instance is no training target
    assert clips[1]["masks"].shape[0] == 0


def test_instances_absent_from_every_sampled_frame_are_dropped(tmp_path):
    write_ytvis_root(tmp_path)
    data = load_video_dataset(tmp_path, "train")
    clips = VideoClipDataset(data, num_frames=2, frame_range=1, training=True, seed=0)
    seen_only_first = False
    for epoch in range(20):
        clips.set_epoch(epoch)
        clip = clips[0]
        if 3 not in clip["frame_indices"]:
            assert clip["instance_ids"] == [11]
            seen_only_first = True
        assert clip["masks"].shape[:2] == (len(clip["instance_ids"]), 2)
    assert seen_only_first


def test_training_frames_follow_the_original_rule():
    rng = np.random.default_rng(0)
    for _ in range(500):
        frames = sample_training_frames(video_length=30, num_frames=3, frame_range=5, rng=rng)
        assert len(frames) == 3 and frames == sorted(frames)
        assert max(frames) - min(frames) <= 10  # all within range of the reference frame
    draws = [tuple(sample_training_frames(40, 2, 20, np.random.default_rng(seed))) for seed in range(200)]
    assert all(0 < abs(a - b) <= 20 for a, b in draws)  # the second frame is another frame, within the range
    assert sample_training_frames(1, 2, 20, np.random.default_rng(0)) == [0, 0]


def test_clip_transforms_treat_every_frame_alike():
    frames = [np.random.default_rng(t).integers(0, 255, (20, 30, 3), dtype=np.uint8) for t in range(3)]
    masks = np.zeros((1, 3, 20, 30), dtype=bool)
    masks[0, :, 2:8, 0:5] = True
    record = {"frames": frames, "masks": masks, "class_labels": [0], "instance_ids": [1], "video_id": 1,
              "frame_indices": [0, 1, 2]}  # fmt: skip
    flipped = ClipFlip(prob=1.0)(record, np.random.default_rng(0))
    assert all(np.array_equal(a[:, ::-1], b) for a, b in zip(frames, flipped["frames"]))
    assert flipped["masks"][0, :, 2:8, 25:].all() and not flipped["masks"][0, :, :, :25].any()
    resized = ClipResizeShortestEdge([40])(record, np.random.default_rng(0))
    assert all(frame.shape == (40, 60, 3) for frame in resized["frames"])
    assert resized["masks"].shape == (1, 3, 40, 60) and resized["masks"][0, :, 4:16, 0:10].all()


def test_collator_gives_model_inputs(tmp_path):
    write_ytvis_root(tmp_path)
    clips = VideoClipDataset(load_video_dataset(tmp_path, "train"), num_frames=None, training=False)
    processor = VideoMask2FormerVideoProcessor(size={"shortest_edge": 48, "longest_edge": 64})
    batch = VideoClipCollator(processor, keep_targets=True)([clips[0], clips[1]])
    assert batch["pixel_values_videos"].shape == (2, LENGTH, 3, 64, 64)
    assert batch["pixel_mask"].shape == (2, 64, 64)
    assert batch["mask_labels"][0].shape == (2, LENGTH, 64, 64) and batch["mask_labels"][1].shape[0] == 0
    assert batch["class_labels"][0].tolist() == [1, 0]
    assert batch["targets"][0] == {"video_id": 1, "frame_indices": [0, 1, 2, 3], "size": (HEIGHT, WIDTH)}


def test_a_missing_split_and_bad_annotations_are_clear_errors(tmp_path):
    write_ytvis_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="no 'valid' annotations"):
        load_video_dataset(tmp_path, "val")
    annotation_file = tmp_path / "train.json"
    payload = json.loads(annotation_file.read_text())
    payload["annotations"][0]["segmentations"] = payload["annotations"][0]["segmentations"][:2]
    annotation_file.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="has 2 frame segmentations but video 1 has 4 frames"):
        load_video_dataset(tmp_path, "train")


def test_synthetic_moving_shapes_are_written_in_youtube_vis_format_and_read_back(tmp_path):
    root = generate_synthetic_moving_shapes(tmp_path, seed=3, num_train_videos=6, num_val_videos=3, num_frames=5,
                                            image_size=64)  # fmt: skip
    assert generate_synthetic_moving_shapes(tmp_path, seed=3, num_train_videos=6, num_val_videos=3, num_frames=5,
                                            image_size=64) == root  # fmt: skip
    payload = json.loads((root / "valid.json").read_text())
    assert len(payload["videos"]) == 3 and payload["annotations"]
    frames_with_nulls = sum(
        segmentation is None for a in payload["annotations"] for segmentation in a["segmentations"]
    )
    data = load_video_dataset("synthetic-moving-shapes", "val", cache_dir=tmp_path, seed=3, num_train_videos=6,
                              num_val_videos=3, num_frames=5, image_size=64)  # fmt: skip
    assert data.annotation_file == root / "valid.json"
    assert data.label_info.id2label == {0: "circle", 1: "square", 2: "triangle"}
    clip = VideoClipDataset(data, num_frames=None, training=False)[0]
    assert len(clip["frames"]) == 5 and clip["frames"][0].shape == (64, 64, 3)
    assert clip["masks"].shape[1:] == (5, 64, 64) and clip["masks"].any(axis=(1, 2, 3)).all()
    # the shapes move: a tube's mask changes from frame to frame
    first = clip["masks"][0]
    assert any(not np.array_equal(first[t], first[t + 1]) for t in range(4))
    # over the two splits some instance is absent from some frame (late entry, exit or full occlusion)
    train = json.loads((root / "train.json").read_text())
    frames_with_nulls += sum(s is None for a in train["annotations"] for s in a["segmentations"])
    assert frames_with_nulls > 0
