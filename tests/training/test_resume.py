"""Exact resume: N steps + resume + N steps ends with the weights of 2N uninterrupted steps.

The uninterrupted run checkpoints at step N (and keeps going); a second run starts in a fresh folder that holds only
that checkpoint (plus a half-written temporary folder, as a kill during saving leaves it), resumes with
``--resume-from latest`` and must reproduce the same losses and the same final weights: same data order (mid-epoch),
same augmentation draws, same learning rate, same RNG stream for the point sampling, with gradient accumulation.
"""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from mask2former.training.checkpoints import list_checkpoints
from mask2former.training.settings import load_recipe
from mask2former.training.train import main

# 8 training images, batch 1 x 2 micro-batches: 4 steps per epoch, so the step-3 checkpoint is mid-epoch and the
# resumed run crosses the epoch boundary (after step 4) before it ends at step 6.
ARGS = [
    *("--no-progress", "--max-steps", "6", "--save-every", "3", "--keep-last", "5", "--per-device-batch-size", "1"),
    *("--gradient-accumulation-steps", "2", "--log-every", "1", "--seed", "3"),
]


def _recipe(tmp_path):
    recipe = load_recipe("tiny-test")
    recipe["dataset_options"]["num_train_images"] = 8
    path = tmp_path / "tiny-resume.json"
    path.write_text(json.dumps(recipe))
    return ["--recipe", str(path)]


def _losses(output_dir):
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return {record["step"]: (record["loss"], record["lr"]) for record in map(json.loads, lines)}


def test_n_steps_resume_n_steps_equals_2n_steps(tmp_path):
    straight = tmp_path / "straight"
    assert main([*_recipe(tmp_path), *ARGS, "--output-dir", str(straight)]) == 0
    midway = [path for path in list_checkpoints(straight) if path.name.endswith("00000003")][0]

    resumed = tmp_path / "resumed"
    shutil.copytree(midway, resumed / "checkpoints" / midway.name)
    # what a run killed while writing its step-5 checkpoint leaves behind: resume must not pick it
    broken = resumed / "checkpoints" / ".tmp-checkpoint-00000005"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    assert main([*_recipe(tmp_path), *ARGS, "--output-dir", str(resumed), "--resume-from", "latest"]) == 0

    straight_log, resumed_log = _losses(straight), _losses(resumed)
    assert sorted(resumed_log) == [4, 5, 6]  # it continued at step 4
    for step in (4, 5, 6):
        assert resumed_log[step][1] == straight_log[step][1], f"learning rate differs at step {step}"
        assert abs(resumed_log[step][0] - straight_log[step][0]) < 1e-5, f"loss differs at step {step}"

    final_straight = load_file(straight / "model" / "model.safetensors")
    final_resumed = load_file(resumed / "model" / "model.safetensors")
    at_resume = load_file(midway / "pretrained" / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for name in final_straight:
        torch.testing.assert_close(final_resumed[name], final_straight[name], atol=1e-6, rtol=1e-5, msg=name)
    # and the second half did train: the weights moved away from the checkpoint
    assert any(not torch.equal(final_straight[name], at_resume[name]) for name in final_straight)
