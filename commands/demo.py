"""``mask2former demo`` (``make demo``): train a small Mask2Former on synthetic shapes, evaluate, reload, segment.

Steps, all on this machine with no network:

1. train with the ``synthetic-shapes-demo`` recipe through the training API (`resolve_settings` + `train`), in two
   processes under ``accelerate launch`` (gloo, CPU) where there are two cores or more: it generates the data,
   trains, evaluates PQ on the held-out images and saves the model (safetensors + processor + model card) to
   ``<output-dir>/model``;
2. reload that folder with ``from_pretrained`` (ours, and stock transformers' for the compatibility check);
3. score the held-out images with the reloaded model (`evaluate_model`), write an overlay PNG per image (prediction
   next to the ground truth) and ``demo_metrics.json`` (PQ/SQ/RQ of the reloaded model, wall times, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mask2former.families import family_of
from mask2former.processing.visualization import draw_panoptic_segmentation
from mask2former.training.build_data import build_data
from mask2former.training.evaluate import EvaluationSet, evaluate_model, segment_dataset
from mask2former.training.settings import COMMAND, TrainArguments, TrainSettings, resolve_settings

HELP = "offline demo: train on synthetic shapes (CPU), evaluate PQ, reload with from_pretrained, draw overlays"
DEFAULT_OUTPUT_DIR = "runs/demo"
DEFAULT_RECIPE = "synthetic-shapes-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the run, overlays and metrics go")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="training recipe (name or .json path)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="training processes (default: 2 when the machine has 2 cores or more, else 1)",
    )
    parser.add_argument("--num-overlays", type=int, default=16, help="held-out images drawn as overlay PNGs")
    parser.add_argument("--skip-training", action="store_true", help="reuse <output-dir>/model from an earlier run")


def _training_command(arguments: TrainArguments) -> list[str]:
    """The training command line of ``arguments`` (what a user types to run the same training)."""
    command = ["--recipe", str(arguments.recipe), "--output-dir", str(arguments.output_dir)]
    if arguments.max_steps is not None:
        command += ["--max-steps", str(arguments.max_steps)]
    return command


def run_training(arguments: TrainArguments, settings: TrainSettings, num_processes: int) -> None:
    """Train in this process, or in ``num_processes`` CPU processes under ``accelerate launch``."""
    if num_processes == 1:
        from mask2former.training.train import train  # needs accelerate (the train extra): imported when used

        train(settings)
        return
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    # --multi_gpu gives N gloo ranks on a CPU-only machine because the trainer creates Accelerator(cpu=True)
    launch += ["--dynamo_backend", "no", "--multi_gpu", "--num_processes", str(num_processes)]
    launch += ["--main_process_port", "0", "-m", "mask2former.training.train", *_training_command(arguments)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$ accelerate launch " + shlex.join(launch[3:]), flush=True)
    subprocess.run(launch, check=True, env=env)


def _overlay(record: dict[str, Any], prediction: dict[str, Any], target: dict[str, Any], id2label) -> Image.Image:
    """The prediction drawn next to the ground truth."""
    image = np.asarray(record["image"])
    predicted = draw_panoptic_segmentation(image, prediction["segmentation"], prediction["segments_info"], id2label)
    truth_info = [
        {"id": segment_id, "label_id": label}
        for segment_id, label in zip(target["segment_ids"], target["class_labels"])
    ]
    truth = draw_panoptic_segmentation(image, target["segment_map"], truth_info, id2label)
    side_by_side = Image.new("RGB", (predicted.width * 2 + 4, predicted.height), (255, 255, 255))
    side_by_side.paste(predicted, (0, 0))
    side_by_side.paste(truth, (predicted.width + 4, 0))
    return side_by_side


def segment_held_out(settings: TrainSettings, num_overlays: int) -> dict[str, Any]:
    """Reload the saved model, score it on the held-out images and draw overlays; returns the metrics."""
    model_dir = settings.output_dir / "model"
    family = family_of(model_dir)
    model = family.model_class.from_pretrained(model_dir).eval()
    processor = family.processor_class.from_pretrained(model_dir)
    stock_loads_cleanly = None
    if family.transformers_class is not None:  # our checkpoints are transformers': stock transformers loads them
        _, loading_info = family.transformers_class.from_pretrained(model_dir, output_loading_info=True)
        stock_loads_cleanly = not any(
            loading_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        )

    data = build_data(settings, processor)
    evaluation = EvaluationSet(data.eval_dataset, data.eval_collate_fn, settings.task, data.label_info)
    options = {"batch_size": 8, "inference": settings.inference}
    metrics = evaluate_model(model, processor, evaluation, **options)
    overlay_dir = settings.output_dir / "segmentations"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    drawn = list(range(min(num_overlays, len(data.eval_dataset))))
    for indices, targets, predictions in segment_dataset(model, processor, evaluation, indices=drawn, **options):
        for index, target, prediction in zip(indices, targets, predictions):
            record = data.eval_dataset[index]
            name = Path(str(record.get("file_name", index))).stem
            _overlay(record, prediction, target, model.config.id2label).save(overlay_dir / f"{name}.png")
    return {
        "metrics": metrics,
        "num_held_out_images": len(data.eval_dataset),
        "num_overlays": len(drawn),
        "overlay_dir": str(overlay_dir),
        "stock_transformers_loads_cleanly": stock_loads_cleanly,
        "recipe": settings.recipe_name,
    }


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    arguments = TrainArguments(
        recipe=args.recipe,
        output_dir=args.output_dir,
        max_steps=args.max_steps,
    )
    arguments.command = shlex.join([COMMAND, *_training_command(arguments)])  # the training the demo runs
    try:
        settings = resolve_settings(arguments)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_processes = args.num_processes or (2 if (os.cpu_count() or 1) >= 2 else 1)
    if not args.skip_training:
        run_training(arguments, settings, num_processes)
    train_seconds = time.perf_counter() - start
    result = segment_held_out(settings, args.num_overlays)
    total_seconds = time.perf_counter() - start
    run_info = json.loads((settings.output_dir / "run_info.json").read_text())
    training_metrics = json.loads((settings.output_dir / "metrics.json").read_text())
    summary = {
        **result,
        "training_metrics": training_metrics,
        "num_processes": run_info.get("num_processes"),
        "max_steps": run_info.get("max_steps"),
        "effective_batch_size": run_info.get("effective_batch_size"),
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(total_seconds, 1),
    }
    (settings.output_dir / "demo_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    headline = {key: round(value, 2) for key, value in result["metrics"].items() if key in ("PQ", "SQ", "RQ")}
    print(
        f"demo: held-out {headline} on {result['num_held_out_images']} images; "
        f"{summary['total_wall_seconds']:.0f} s in all ({summary['train_wall_seconds']:.0f} s training); "
        f"overlays in {result['overlay_dir']}, metrics in {settings.output_dir / 'demo_metrics.json'}"
    )
    return 0
