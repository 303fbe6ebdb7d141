"""A genuinely two-process run: ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (two gloo ranks, because
the script creates its Accelerator with ``cpu=True`` when there is no GPU), a few steps of a tiny config on
synthetic-shapes and on the real COCO sample: the world size is 2, the loss is finite and falls, a checkpoint and the
metrics are written, the saved model loads in stock transformers, and (synthetic run) the final model is pushed
through the real huggingface_hub client to the local Hub stand-in of test_hub.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mask2former.training.checkpoints import list_checkpoints
from mask2former.training.settings import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[2]


def _hub_test_module():
    spec = importlib.util.spec_from_file_location("hub_stand_in", Path(__file__).with_name("test_hub.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(arguments: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += ["-m", "mask2former.training.train", "--no-progress", *arguments]
    environment = dict(env or os.environ)
    environment.setdefault("HF_HUB_OFFLINE", "1")
    environment.pop("ACCELERATE_USE_CPU", None)  # the script must choose the CPU by itself
    result = subprocess.run(command, env=environment, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _check_run(output_dir: Path, result: subprocess.CompletedProcess) -> dict:
    import transformers

    run_info = json.loads((output_dir / "run_info.json").read_text())
    assert run_info["num_processes"] == 2  # accelerator.num_processes == torch.distributed world size
    assert "2 process(es) on cpu" in result.stdout + result.stderr
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"loss did not fall: {losses}"
    checkpoint = list_checkpoints(output_dir)[-1]
    # both ranks wrote their RNG state into the checkpoint
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (checkpoint / "pretrained" / "model.safetensors").is_file()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert "PQ" in metrics and all(0.0 <= value <= 100.0 for value in metrics.values())
    model, info = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(
        output_dir / "model", output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return run_info


def test_two_process_run_on_synthetic_shapes_and_push(tmp_path):
    hub_module = _hub_test_module()
    output_dir = tmp_path / "synthetic"
    with hub_module.HubStandIn() as stand_in:
        result = _launch(
            ["--recipe", "tiny-test", "--output-dir", str(output_dir), "--max-steps", "8", "--save-every", "4"]
            + ["--log-every", "1", "--push-to-hub", "me/tiny-synthetic"],
            env={**hub_module.hub_client_env(stand_in.endpoint), "HF_HUB_OFFLINE": "0"},
        )
    run_info = _check_run(output_dir, result)
    assert run_info["effective_batch_size"] == 2 * load_recipe("tiny-test")["per_device_batch_size"]
    pushed = stand_in.repos["me/tiny-synthetic"]["files"]
    assert pushed["model.safetensors"] == (output_dir / "model" / "model.safetensors").read_bytes()
    assert {"config.json", "preprocessor_config.json", "README.md", "metrics.json"} <= set(pushed)


def test_two_process_run_on_the_coco_sample(tmp_path, coco_sample_root):
    recipe = load_recipe("tiny-test")
    recipe.update(
        name="tiny-coco-sample",
        dataset=str(coco_sample_root),
        dataset_options={},
        per_device_batch_size=1,  # two images, one per rank
        # large-scale jitter to 128 px crops keeps the steps small; evaluation runs on the full 640x480 images
        augmentation={"name": "coco_lsj", "output_size": 128, "min_scale": 0.5, "max_scale": 1.0, "flip_prob": 0.5},
        schedule={"name": "constant"},
    )
    recipe["model_config"]["num_queries"] = 32  # the sample's images hold up to 17 segments
    recipe_path = tmp_path / "tiny-coco-sample.json"
    recipe_path.write_text(json.dumps(recipe))
    output_dir = tmp_path / "coco"
    result = _launch(
        ["--recipe", str(recipe_path), "--output-dir", str(output_dir), "--max-steps", "6", "--save-every", "3"]
        + ["--log-every", "1"]
    )
    _check_run(output_dir, result)
    config = json.loads((output_dir / "model" / "config.json").read_text())
    assert len(config["id2label"]) == 133  # COCO panoptic's classes, read from the data
    assert config["id2label"]["0"] == "person"
