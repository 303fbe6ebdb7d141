"""training/train.py and training/optim.py: recipes, the command line, parameter groups, schedules, the data order,
and one complete single-process run of the loop on a tiny config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mask2former.training import optim
from mask2former.training.checkpoints import list_checkpoints
from mask2former.training.sampling import ShardedEpochSampler
from mask2former.training.settings import (
    RECIPE_KEYS,
    TrainArguments,
    available_recipes,
    build_parser,
    load_recipe,
    resolve_settings,
)
from mask2former.training.train import main

PAPER_BACKBONES = ("r50", "swin-t", "swin-s", "swin-b", "swin-l")


def _tiny_model():
    from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    return Mask2FormerForUniversalSegmentation(
        Mask2FormerConfig(**load_recipe("tiny-test")["model_config"], num_labels=6)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_paper_recipes_hold_the_papers_settings(backbone):
    # Mask2Former paper (Sec. 4.1 and appendix): AdamW, lr 1e-4, weight decay 0.05, backbone lr x0.1, batch 16,
    # full-model gradient clipping at 0.01; COCO 50 epochs (368,750 iterations; Swin-L 100 epochs) with the LR divided
    # by 10 at 0.9 and 0.95 of training; ADE20K 160k iterations with poly (0.9) decay.
    coco_steps = 737500 if backbone == "swin-l" else 368750
    for task in ("panoptic", "instance"):
        recipe = load_recipe(f"coco-{task}-{backbone}")
        assert recipe["task"] == task and recipe["max_steps"] == coco_steps and recipe["total_batch_size"] == 16
        assert recipe["optimizer"]["lr"] == 1e-4 and recipe["optimizer"]["weight_decay"] == 0.05
        assert recipe["optimizer"]["weight_decay_norm"] == 0 and recipe["optimizer"]["weight_decay_embedding"] == 0
        assert recipe["optimizer"]["backbone_lr_multiplier"] == 0.1 and recipe["gradient_clip_norm"] == 0.01
        schedule = recipe["schedule"]
        assert schedule["name"] == "step" and schedule["gamma"] == 0.1
        assert [round(m / coco_steps, 2) for m in schedule["milestones"]] == [0.89, 0.96]
        assert recipe["augmentation"]["name"] == "coco_lsj" and recipe["augmentation"]["output_size"] == 1024
        assert Path(recipe["model"]).name in {p.name for p in (Path(__file__).parents[2] / "hub_configs").iterdir()}
    ade = load_recipe(f"ade20k-semantic-{backbone}")
    assert ade["task"] == "semantic" and ade["max_steps"] == 160000 and ade["total_batch_size"] == 16
    assert (
        ade["schedule"]["name"] == "poly" and ade["schedule"]["power"] == 0.9 and ade["schedule"]["warmup_steps"] > 0
    )
    assert ade["optimizer"]["lr"] == 1e-4 and ade["gradient_clip_norm"] == 0.01
    assert Path(ade["model"]).name in {p.name for p in (Path(__file__).parents[2] / "hub_configs").iterdir()}


def test_recipe_names_accept_long_backbone_names_and_json_paths(tmp_path):
    assert load_recipe("coco-panoptic-swin-tiny") == load_recipe("coco-panoptic-swin-t")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"max_steps": 3, "optimizer": {"lr": 0.1}}))
    assert load_recipe(str(custom))["name"] == "mine"
    assert {"tiny-test", "synthetic-shapes-demo", "coco-panoptic-swin-l"} <= set(available_recipes())


def test_every_recipe_key_is_resolved_into_the_settings_and_unknown_keys_are_refused(tmp_path):
    recipe = load_recipe("tiny-test")
    recipe.update(train_with_pixel_mask=True, inference={"threshold": 0.3})
    path = tmp_path / "with-extras.json"
    path.write_text(json.dumps(recipe))
    settings = resolve_settings(TrainArguments(recipe=str(path), output_dir=tmp_path / "run"))
    assert settings.train_with_pixel_mask is True
    assert settings.inference == {"threshold": 0.3, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8}
    assert not hasattr(settings, "recipe")  # no raw recipe to read past resolution
    resolved = settings.resolved_recipe()
    assert set(resolved) == RECIPE_KEYS  # each key of a recipe has its resolved value
    # the recipe's thresholds are those of its task: another task gets that task's defaults
    other = resolve_settings(TrainArguments(recipe=str(path), output_dir=tmp_path / "run", task="instance"))
    assert other.inference["threshold"] == 0.0
    recipe["learning_rate"] = 0.1
    path.write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]"):
        load_recipe(str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def test_help_explains_every_option_of_the_issue(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--recipe", "--model", "--dataset", "--output-dir", "--max-steps", "--epochs", "--per-device-batch-size",
        "--gradient-accumulation-steps", "--mixed-precision", "--eval-every", "--save-every", "--resume-from",
        "--push-to-hub", "--seed", "--num-workers", "--keep-last",
    ):  # fmt: skip
        assert flag in text, flag
    assert "coco-panoptic-swin-t" in text  # the recipes are listed


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--recipe", "coco-panoptic-vit-h"], "--recipe"),
        (["--max-steps", "0"], "--max-steps"),
        (["--mixed-precision", "fp8"], "--mixed-precision"),
        (["--resume-from", "/nonexistent/checkpoint-7"], "--resume-from"),
        (["--push-to-hub", "not a repo id!"], "--push-to-hub"),
        (["--model", "./no/such/folder"], "--model"),
        (["--dataset", "./no/such/root"], "--dataset"),
        (["--per-device-batch-size", "-2"], "--per-device-batch-size"),
        (["--push-checkpoints"], "--push-checkpoints"),
        (["--max-steps", "5", "--epochs", "2"], "--epochs"),
    ],
)
def test_a_wrong_value_fails_before_any_work_naming_it(tmp_path, capsys, arguments, named):
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", "tiny-test", "--output-dir", str(output_dir), *arguments])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not output_dir.exists()  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_on_a_cpu_is_refused_when_asked_for(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--recipe", "tiny-test", "--output-dir", str(tmp_path / "run"), "--mixed-precision", "fp16"])
    assert "fp16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer groups and schedules
# ---------------------------------------------------------------------------------------------------------------------
def test_param_groups_backbone_lr_and_no_decay_on_norms_and_embeddings():
    model = _tiny_model()
    config = {"lr": 1e-4, "weight_decay": 0.05, "weight_decay_norm": 0.0, "weight_decay_embedding": 0.0,
              "backbone_lr_multiplier": 0.1}  # fmt: skip
    groups = optim.build_param_groups(model, config)
    group_of = {id(param): group for group in groups for param in group["params"]}
    named = dict(model.named_parameters())
    assert len(group_of) == len(named) == sum(len(group["params"]) for group in groups)  # each exactly once
    modules = dict(model.named_modules())
    for name, param in named.items():
        group = group_of[id(param)]
        owner = modules[name.rsplit(".", 1)[0]]
        expected_lr = 1e-5 if name.startswith("model.pixel_level_module.encoder.") else 1e-4
        assert group["lr"] == pytest.approx(expected_lr), name
        if isinstance(owner, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding)):
            assert group["weight_decay"] == 0.0, name
        if isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith("weight"):
            assert group["weight_decay"] == 0.05, name
    # the learnable queries, the level embeddings and Swin's relative-position tables are embeddings: no decay
    for name in ("model.transformer_module.queries_features.weight", "model.transformer_module.level_embed.weight"):
        assert group_of[id(named[name])]["weight_decay"] == 0.0
    tables = [name for name in named if name.endswith("relative_position_bias_table")]
    assert tables and all(group_of[id(named[name])]["weight_decay"] == 0.0 for name in tables)


def test_step_poly_and_warmup_schedules():
    step = optim.lr_multiplier({"name": "step", "milestones": [10, 20], "gamma": 0.1}, 30)
    assert [step(s) for s in (0, 9, 10, 19, 20, 29)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    poly = optim.lr_multiplier({"name": "poly", "power": 0.9}, 100)
    assert poly(0) == 1 and poly(50) == pytest.approx(0.5**0.9) and poly(100) == 0
    warm = optim.lr_multiplier({"name": "poly", "power": 0.9, "warmup_steps": 10, "warmup_factor": 0.001}, 100)
    assert warm(0) == pytest.approx(0.001)
    assert warm(5) == pytest.approx((0.001 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)
    assert warm(10) == pytest.approx(poly(10))
    with pytest.raises(ValueError, match="cosine-restarts"):
        optim.lr_multiplier({"name": "cosine-restarts"}, 10)


# ---------------------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------------------
def test_sharded_sampler_splits_disjointly_reshuffles_per_epoch_and_resumes_mid_epoch():
    samplers = [ShardedEpochSampler(23, 3, 2, rank, seed=5) for rank in range(2)]
    assert samplers[0].batches_per_epoch == 3  # 11 images per rank -> 3 full batches of 3
    epoch0 = [[index for batch in sampler for _, index in batch] for sampler in samplers]
    assert not set(epoch0[0]) & set(epoch0[1]) and len(set(epoch0[0])) == 9
    for sampler in samplers:
        sampler.set_epoch(1)
    epoch1 = [index for batch in samplers[0] for _, index in batch]
    assert epoch1 != epoch0[0]  # a new permutation each epoch, a function of (seed, epoch) only
    samplers[0].set_epoch(1, start_batch=2)
    assert [index for batch in samplers[0] for _, index in batch] == epoch1[6:]
    assert all(epoch == 1 for batch in samplers[0] for epoch, _ in batch)
    with pytest.raises(ValueError, match="per-device-batch-size"):
        ShardedEpochSampler(3, 4, 2, 0, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# One complete run
# ---------------------------------------------------------------------------------------------------------------------
def test_single_process_run_logs_checkpoints_evaluates_and_saves(tmp_path):
    output_dir = tmp_path / "run"
    assert main(["--recipe", "tiny-test", "--output-dir", str(output_dir), "--no-progress", "--max-steps", "4",
                 "--save-every", "1", "--keep-last", "2", "--eval-every", "2", "--log-every", "1"]) == 0  # fmt: skip
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    assert all(math.isfinite(record["loss"]) and record["loss"] > 0 for record in log)
    # tiny-test warms up over 2 steps from 0.1 x lr, then steps down x0.1 at step 4 (0-based 3 is still before)
    assert [record["lr"] for record in log] == pytest.approx([1e-4, 5.5e-4, 1e-3, 1e-3])
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-00000003", "checkpoint-00000004"]
    assert not list((output_dir / "checkpoints").glob(".tmp-*"))
    latest = list_checkpoints(output_dir)[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["num_processes"] == 1
    assert (latest / "pretrained" / "model.safetensors").is_file() and (latest / "optimizer.bin").is_file()
    evaluations = [json.loads(line) for line in (output_dir / "eval_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in evaluations] == [2, 4] and "PQ" in evaluations[-1]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"}
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))  # tensorboard through accelerate
    card = (output_dir / "model" / "README.md").read_text()
    assert "tiny-test" in card and "--max-steps 4" in card and "| PQ |" in card

    from mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    model = Mask2FormerForUniversalSegmentation.from_pretrained(output_dir / "model")
    assert model.config.id2label[0] == "circle" and model.config.num_labels == 6
    assert Mask2FormerImageProcessor.from_pretrained(output_dir / "model").size_divisor == 32
