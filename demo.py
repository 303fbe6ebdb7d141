"""The offline demo (``make demo``): train a small Mask2Former on synthetic shapes, evaluate, reload, segment.

Steps, all on this machine with no network:

1. ``accelerate launch`` the training script with the ``synthetic-shapes-demo`` recipe, two processes (gloo, CPU)
   where there are two cores or more; it generates the data, trains, evaluates PQ on the held-out images and saves
   the model (safetensors + processor + model card) to ``<output-dir>/model``;
2. reload that folder with ``from_pretrained`` (ours, and stock transformers' for the compatibility check);
3. segment the held-out images with the reloaded model, write an overlay PNG per image (prediction next to the
   ground truth) and ``demo_metrics.json`` (PQ/SQ/RQ of the reloaded model, wall times, settings).

Run: ``python -m mask2former.demo [--output-dir runs/demo] [--max-steps N] [--num-processes N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT_DIR = "runs/demo"
DEFAULT_RECIPE = "synthetic-shapes-demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mask2former.demo",
        description="Offline demo: train Mask2Former on synthetic-shapes with accelerate (CPU), evaluate PQ on "
        "held-out images, reload with from_pretrained, and write overlay PNGs and a metrics JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    return parser


def launch_training(args: argparse.Namespace, num_processes: int) -> None:
    """Run the training script under ``accelerate launch`` (one or several CPU processes)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    if num_processes > 1:
        # --multi_gpu gives N gloo ranks on a CPU-only machine because the script creates Accelerator(cpu=True)
        launch += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    else:
        launch += ["--num_processes", "1"]
    train = ["-m", "mask2former.training.train", "--recipe", args.recipe, "--output-dir", args.output_dir]
    if args.max_steps is not None:
        train += ["--max-steps", str(args.max_steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("$ " + " ".join(["accelerate launch", *launch[3:], *train]), flush=True)
    subprocess.run(launch + train, check=True, env=env)


def segment_held_out(output_dir: Path, recipe_name: str, num_overlays: int) -> dict[str, Any]:
    """Reload the saved model, score it on the held-out images and draw overlays; returns the metrics."""
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from tqdm.auto import tqdm

    from mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from mask2former.processing.tasks import post_process
    from mask2former.processing.visualization import draw_panoptic_segmentation
    from mask2former.training.build_data import build_data
    from mask2former.training.metrics import build_evaluator
    from mask2former.training.settings import TrainArguments, load_recipe, resolve_settings

    model_dir = output_dir / "model"
    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(model_dir)
    # the checkpoint is transformers' format: stock transformers loads it without missing or unexpected keys
    _, loading_info = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(
        model_dir, output_loading_info=True
    )
    stock_loads_cleanly = not any(loading_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))

    settings = resolve_settings(TrainArguments(recipe=recipe_name, output_dir=output_dir))
    data = build_data(settings, processor)
    id2label = model.config.id2label
    evaluator = build_evaluator(settings.task, data.label_info)
    overlay_dir = output_dir / "segmentations"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    indices = list(range(len(data.eval_dataset)))
    batch_size = 8
    for start in tqdm(range(0, len(indices), batch_size), desc="segment held-out images"):
        records = [data.eval_dataset[index] for index in indices[start : start + batch_size]]
        batch = data.eval_collate_fn(records)
        targets = batch.pop("targets")
        target_sizes = [tuple(target["segment_map"].shape[-2:]) for target in targets]
        with torch.no_grad():
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        predictions = post_process(
            processor,
            outputs,
            settings.task,
            target_sizes,
            pixel_mask=batch["pixel_mask"],
            inference=settings.inference,
            label_ids_to_fuse=data.label_info.stuff_ids,
        )
        evaluator.update(predictions, targets)
        for record, prediction, target in zip(records, predictions, targets):
            if written >= num_overlays:
                break
            image = np.asarray(record["image"])
            predicted = draw_panoptic_segmentation(
                image, prediction["segmentation"], prediction["segments_info"], id2label
            )
            truth_info = [
                {"id": segment_id, "label_id": label}
                for segment_id, label in zip(target["segment_ids"], target["class_labels"])
            ]
            truth = draw_panoptic_segmentation(image, target["segment_map"], truth_info, id2label)
            side_by_side = Image.new("RGB", (predicted.width * 2 + 4, predicted.height), (255, 255, 255))
            side_by_side.paste(predicted, (0, 0))
            side_by_side.paste(truth, (predicted.width + 4, 0))
            side_by_side.save(overlay_dir / f"{Path(str(record.get('file_name', written))).stem}.png")
            written += 1
    metrics = evaluator.compute()
    return {
        "metrics": metrics,
        "num_held_out_images": len(indices),
        "num_overlays": written,
        "overlay_dir": str(overlay_dir),
        "stock_transformers_loads_cleanly": stock_loads_cleanly,
        "recipe": load_recipe(recipe_name)["name"],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    num_processes = args.num_processes or (2 if (os.cpu_count() or 1) >= 2 else 1)
    if not args.skip_training:
        launch_training(args, num_processes)
    train_seconds = time.perf_counter() - start
    result = segment_held_out(output_dir, args.recipe, args.num_overlays)
    total_seconds = time.perf_counter() - start
    run_info = json.loads((output_dir / "run_info.json").read_text())
    training_metrics = json.loads((output_dir / "metrics.json").read_text())
    summary = {
        **result,
        "training_metrics": training_metrics,
        "num_processes": run_info.get("num_processes"),
        "max_steps": run_info.get("max_steps"),
        "effective_batch_size": run_info.get("effective_batch_size"),
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(total_seconds, 1),
    }
    (output_dir / "demo_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    headline = {key: round(value, 2) for key, value in result["metrics"].items() if key in ("PQ", "SQ", "RQ")}
    print(
        f"demo: held-out {headline} on {result['num_held_out_images']} images; "
        f"{summary['total_wall_seconds']:.0f} s in all ({summary['train_wall_seconds']:.0f} s launch + training); "
        f"overlays in {result['overlay_dir']}, metrics in {output_dir / 'demo_metrics.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
