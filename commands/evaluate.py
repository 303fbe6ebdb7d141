"""``mask2former evaluate``: score prediction files as the benchmark does and print the metrics as JSON.

    mask2former evaluate --task panoptic --ground-truth COCO_ROOT [--split val2017] --predictions PRED.json \
        [--predictions-dir PNG_DIR]
    mask2former evaluate --task instance --ground-truth COCO_ROOT --predictions RESULTS.json
    mask2former evaluate --task semantic --ground-truth ADE_OR_COCO_ROOT --split validation --predictions PNG_DIR
    mask2former evaluate --task video-instance --ground-truth YTVIS.json --predictions RESULTS.json

Formats are the datasets' own: COCO panoptic JSON + PNG folder (by default the JSON path without ``.json``), a COCO
results JSON with RLE masks, semantic PNGs named after the images holding category ids (ADE20K 1-150), a results
JSON in the YouTube-VIS submission format against a YouTube-VIS json (video AP). The scoring is
``mask2former.training.evaluate`` (``video_metrics`` for video AP), the code the training loop uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mask2former.processing.tasks import TASKS, VIDEO_TASKS
from mask2former.training.evaluate import evaluate_instance_files, evaluate_panoptic_files, evaluate_semantic_files

HELP = (
    "Score panoptic / instance / semantic / video-instance prediction files (PQ, mask AP, mIoU, video AP) and print "
    "the metrics as JSON."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=(*TASKS, *VIDEO_TASKS))
    parser.add_argument(
        "--ground-truth", required=True, type=Path, help="a COCO root, an ADE20K root, or a YouTube-VIS json"
    )
    parser.add_argument("--split", default="val2017", help="COCO: val2017 (default); ADE20K: validation")
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        help="panoptic: COCO panoptic JSON; instance: COCO results JSON; semantic: folder of PNGs; video-instance: "
        "YouTube-VIS results JSON",
    )
    parser.add_argument(
        "--predictions-dir",
        type=Path,
        default=None,
        help="panoptic PNG folder (default: the --predictions path without .json)",
    )
    parser.add_argument(
        "--skip-bad-input",
        action="store_true",
        help="skip (and count, in 'skipped') images whose predictions are missing or malformed instead of stopping",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the metrics JSON to this file")


def main(args: argparse.Namespace) -> int:
    on_bad_input = "skip" if args.skip_bad_input else "raise"
    split = args.split
    if args.task == "semantic" and (args.ground_truth / "images").is_dir() and split == "val2017":
        split = "validation"  # the default split named in ADE20K's own terms
    if not args.predictions.exists():
        print(f"error: predictions {args.predictions} do not exist", file=sys.stderr)
        return 2
    try:
        if args.task == "panoptic":
            metrics = evaluate_panoptic_files(
                args.ground_truth, split, args.predictions, args.predictions_dir, on_bad_input
            )
        elif args.task == "video-instance":
            from mask2former.training.video_metrics import evaluate_video_results

            metrics = evaluate_video_results(args.ground_truth, args.predictions)
        elif args.task == "instance":
            metrics = evaluate_instance_files(args.ground_truth, split, args.predictions, on_bad_input)
        else:
            metrics = evaluate_semantic_files(args.ground_truth, split, args.predictions, on_bad_input)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0
