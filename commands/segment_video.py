"""``mask2former segment-video``: video instance segmentation of a folder of frames (or a video file) with a video
Mask2Former, written as per-frame overlays and a results JSON in the YouTube-VIS submission format.

    mask2former segment-video FRAMES_DIR_OR_VIDEO --model MODEL_DIR [--output-dir OUT] [--window 10] [--top-k 10]
        [--threshold 0.5] [--gif]

Frames are the folder's images in name order; a video file needs PyAV (``pip install av``). The video runs as one
clip when it has at most ``--window`` frames, else window by window (``processing.video_windows``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "Segment the instances of a video (a folder of frames or a video file) and write overlays + a results JSON."
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def read_video_frames(source: Path) -> list:
    """The frames of a folder (images in name order) or of a video file, as RGB PIL images."""
    from PIL import Image

    if source.is_dir():
        paths = sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"{source} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        frames = []
        for path in paths:
            with Image.open(path) as image:
                frames.append(image.convert("RGB"))
        sizes = {frame.size for frame in frames}
        if len(sizes) > 1:
            raise ValueError(f"the frames in {source} differ in size ({sorted(sizes)}); a video has one frame size.")
        return frames
    if not source.is_file():
        raise FileNotFoundError(f"{source} is neither a folder of frames nor a video file.")
    from mask2former.utils.optional import require

    av = require("av", "reading video files")
    with av.open(str(source)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a folder of frames (name order) or a video file (needs PyAV)")
    parser.add_argument("--model", required=True, help="a video Mask2Former folder (or an image checkpoint)")
    parser.add_argument("--output-dir", type=Path, default=Path("segment-video-output"))
    parser.add_argument("--window", type=int, default=10, help="frames per clip for long videos (default 10)")
    parser.add_argument("--overlap", type=int, default=1, help="frames shared by consecutive windows (default 1)")
    parser.add_argument("--top-k", type=int, default=10, help="instances kept per video (the original: 10)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score an instance needs to be drawn")
    parser.add_argument("--video-id", type=int, default=1, help="video_id written into the results JSON")
    parser.add_argument("--gif", action="store_true", help="also write the overlays as an animated GIF")


def main(args: argparse.Namespace) -> int:
    import torch

    from mask2former import VideoMask2FormerForVideoSegmentation
    from mask2former.processing.video_processing_mask2former import VideoMask2FormerVideoProcessor
    from mask2former.processing.video_visualization import draw_video_instances, save_clip_animation
    from mask2former.processing.video_windows import windowed_video_outputs

    try:
        frames = read_video_frames(args.source)
        model = VideoMask2FormerForVideoSegmentation.from_pretrained(args.model).eval()
        processor = VideoMask2FormerVideoProcessor.from_pretrained(args.model)
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    inputs = processor([frames], return_tensors="pt")
    with torch.no_grad():
        if len(frames) <= args.window:
            outputs = model(pixel_values_videos=inputs["pixel_values_videos"], pixel_mask=inputs["pixel_mask"])
        else:
            outputs = windowed_video_outputs(
                model, inputs["pixel_values_videos"], inputs["pixel_mask"], args.window, args.overlap
            )
    width, height = frames[0].size
    [dense] = processor.post_process_video_instance_segmentation(
        outputs, target_sizes=[(height, width)], pixel_mask=inputs["pixel_mask"], top_k=args.top_k
    )
    from mask2former.processing.post_processing import _encode_rle, _pycocotools_mask

    mask_utils = _pycocotools_mask()
    id2label = model.config.id2label
    # YouTube-VIS numbers its categories 1..K in the order of the model's labels 0..K-1; an empty frame is null
    results = [
        {
            "video_id": args.video_id,
            "category_id": int(label) + 1,
            "label": id2label.get(int(label), str(int(label))),
            "score": round(float(score), 6),
            "segmentations": [rle if frame.any() else None for rle, frame in zip(_encode_rle(mask_utils, tube), tube)],
        }
        for score, label, tube in zip(dense["scores"], dense["labels"], dense["masks"])
    ]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results))
    overlays = draw_video_instances(frames, dense, id2label, score_threshold=args.threshold)
    for index, overlay in enumerate(overlays):
        overlay.save(args.output_dir / f"{index:05d}.png")
    if args.gif:
        save_clip_animation(overlays, args.output_dir / "overlay.gif")
    kept = sum(float(score) >= args.threshold for score in dense["scores"])
    print(f"{len(frames)} frames, {len(results)} instances ({kept} scoring >= {args.threshold}) -> {args.output_dir}")
    return 0
