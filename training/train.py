"""Train Mask2Former with Accelerate: the paper's recipes, checkpoints with exact resume, evaluation, Hub push.

Run it as::

    accelerate launch -m mask2former.training.train --recipe coco-panoptic-swin-t --dataset /data/coco \\
        --output-dir runs/swin-t --push-to-hub me/mask2former-swin-t-coco-panoptic
    python -m mask2former.training.train --recipe synthetic-shapes-demo --output-dir runs/demo   # one process

On a machine without a GPU, ``accelerate launch --multi_gpu --num_processes 2 -m mask2former.training.train ...``
gives two CPU ranks talking over gloo: the script creates its ``Accelerator`` with ``cpu=True`` whenever CUDA is not
available (``accelerate launch --cpu --num_processes 2`` starts a single process).

A recipe (``training/recipes/<name>.json``) holds every training hyper-parameter (DESIGN.md, decision 7); command-line
arguments override it. The loop (one optimizer step = ``gradient_accumulation_steps`` micro-batches per process):

    data (sharded, seeded per epoch) → model(**batch).loss → backward (DDP sync on the last micro-batch)
    → clip the full model's gradient norm → AdamW step → LR schedule step
    → every ``log_every``: tensorboard + ``train_log.jsonl``; every ``eval_every``: PQ / AP / mIoU
    → every ``save_every``: ``accelerator.save_state`` + ``save_pretrained`` into ``checkpoints/.tmp-*``, renamed
      to ``checkpoints/checkpoint-<step>`` once complete, keeping the last ``keep_last``.

Resume is exact: the data order depends only on (seed, epoch, position), the per-sample augmentation randomness only
on (seed, epoch, sample index), and the optimizer, scheduler, step counters and every process's RNG states are in the
checkpoint, so N steps + resume + N steps gives the weights of 2N uninterrupted steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..processing.tasks import TASKS
from .build_data import TrainingData, build_data

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
PRETRAINED_DIRNAME = "pretrained"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
# Short aliases people type for the paper's backbones.
_RECIPE_ALIASES = {"swin-tiny": "swin-t", "swin-small": "swin-s", "swin-base": "swin-b", "swin-large": "swin-l"}


# --------------------------------------------------------------------------------------------------------------------
# Recipes and arguments
# --------------------------------------------------------------------------------------------------------------------
def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``training/recipes/``."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Load a recipe by name (``coco-panoptic-swin-t``) or from a JSON file path.

    Raises:
        ValueError: unknown name (the message lists the available ones) or a file that is not a JSON object.
    """
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        name = name_or_path
        for alias, short in _RECIPE_ALIASES.items():
            name = name.replace(alias, short)
        path = RECIPES_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(
                f"--recipe {name_or_path!r}: no such recipe; available: {', '.join(available_recipes())} "
                "(or give the path of a .json recipe file)"
            )
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--recipe {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"--recipe {str(path)!r} must hold a JSON object")
    recipe.setdefault("name", path.stem)
    return recipe


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The training command line; every option overrides the recipe's value of the same name."""
    parser = argparse.ArgumentParser(
        prog="accelerate launch -m mask2former.training.train",
        description="Train Mask2Former with a recipe (the paper's settings by name); arguments override the recipe. "
        "CPU-only machines: accelerate launch --multi_gpu --num_processes 2 -m mask2former.training.train ... "
        "runs two gloo ranks.",
    )
    parser.add_argument(
        "--recipe",
        default="synthetic-shapes-demo",
        help=f"recipe name or .json path (default: synthetic-shapes-demo); shipped: {', '.join(available_recipes())}",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="what to start from: a Hub id or local folder with weights (fine-tune), or a folder with only "
        "config.json such as hub_configs/<name> (train from scratch); default: the recipe's",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="training data: 'synthetic-shapes', a local COCO root (train2017/ or val2017/ + annotations/) or "
        "ADE20K root (ADEChallengeData2016), or a Hub dataset id; default: the recipe's",
    )
    parser.add_argument("--train-split", default=None, help="split of --dataset to train on (default: the dataset's)")
    parser.add_argument(
        "--eval-dataset", default=None, help="evaluation data (same forms as --dataset); default: --dataset"
    )
    parser.add_argument("--eval-split", default=None, help="split evaluated (default: the dataset's validation)")
    parser.add_argument(
        "--task", choices=TASKS, default=None, help="segmentation task trained and evaluated; default: the recipe's"
    )
    parser.add_argument("--output-dir", required=True, help="folder for checkpoints, logs, metrics and the model")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps (default: recipe's)")
    steps.add_argument("--epochs", type=_positive_int, default=None, help="train this many passes over the data")
    parser.add_argument(
        "--per-device-batch-size", type=_positive_int, default=None, help="images per process per micro-batch"
    )
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=_positive_int,
        default=None,
        help="micro-batches per optimizer step (default: recipe's, or what reaches its total_batch_size)",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION_CHOICES,
        default=None,
        help="mixed-precision autocast dtype; default: the recipe's (a recipe's fp16 becomes 'no' on a CPU, where "
        "asking for fp16 is an error)",
    )
    parser.add_argument("--lr", type=_positive_float, default=None, help="base learning rate (default: recipe's)")
    parser.add_argument(
        "--eval-every", type=_non_negative_int, default=None, help="evaluate every N steps (0: only at the end)"
    )
    parser.add_argument(
        "--num-eval-images", type=_positive_int, default=None, help="evaluate on the first N images (default: all)"
    )
    parser.add_argument(
        "--save-every", type=_non_negative_int, default=None, help="checkpoint every N steps (0: never)"
    )
    parser.add_argument("--keep-last", type=_positive_int, default=None, help="number of checkpoints kept")
    parser.add_argument("--log-every", type=_positive_int, default=None, help="log the losses every N steps")
    parser.add_argument(
        "--resume-from",
        default=None,
        help="continue exactly from a checkpoint folder, or 'latest' (the newest complete one in --output-dir)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the final model to this repo")
    parser.add_argument(
        "--push-checkpoints", action="store_true", help="with --push-to-hub: also upload every checkpoint's model"
    )
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--hub-token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--seed", type=int, default=None, help="seed of weights, data order and augmentation")
    parser.add_argument("--num-workers", type=_non_negative_int, default=None, help="DataLoader worker processes")
    parser.add_argument(
        "--no-tensorboard", action="store_true", help="do not log to tensorboard (train_log.jsonl is always written)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the tqdm progress bar (it is shown on the main process)"
    )
    return parser


@dataclass
class TrainSettings:
    """The recipe merged with the command line: everything one run needs, resolved and validated."""

    recipe: dict[str, Any]
    recipe_name: str
    task: str
    model: str | None
    model_config: dict[str, Any]
    processor_config: dict[str, Any]
    dataset: str
    dataset_options: dict[str, Any]
    train_split: str | None
    eval_dataset: str
    eval_split: str | None
    output_dir: Path
    max_steps: int | None
    epochs: int | None
    per_device_batch_size: int
    gradient_accumulation_steps: int | None
    total_batch_size: int | None
    mixed_precision: str
    mixed_precision_explicit: bool
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    gradient_clip_norm: float | None
    augmentation: dict[str, Any]
    eval_every: int
    num_eval_images: int | None
    save_every: int
    keep_last: int
    log_every: int
    resume_from: str | None
    push_to_hub: str | None
    push_checkpoints: bool
    hub_private: bool
    hub_token: str | None
    seed: int
    num_workers: int
    tensorboard: bool
    progress: bool
    command: str = field(default="")


def _pick(arg_value: Any, recipe: dict[str, Any], key: str, default: Any = None) -> Any:
    return arg_value if arg_value is not None else recipe.get(key, default)


def resolve_settings(args: argparse.Namespace, argv: Sequence[str] | None = None) -> TrainSettings:
    """Merge the recipe and the arguments and check every value, before any model or data is loaded.

    Raises:
        ValueError: a value that cannot work, with the option's name and the fix in the message.
    """
    recipe = load_recipe(args.recipe)
    optimizer = dict(recipe.get("optimizer") or {})
    if args.lr is not None:
        optimizer["lr"] = args.lr
    if "lr" not in optimizer:
        raise ValueError(f"recipe {recipe['name']!r} has no optimizer.lr; add it or pass --lr")
    optimizer.setdefault("weight_decay", 0.0)
    task = _pick(args.task, recipe, "task", "panoptic")
    dataset = _pick(args.dataset, recipe, "dataset")
    if not dataset:
        raise ValueError(
            f"recipe {recipe['name']!r} names no dataset: pass --dataset (a COCO/ADE20K folder, a Hub id, or "
            "'synthetic-shapes')"
        )
    model = _pick(args.model, recipe, "model")
    mixed_precision = _pick(args.mixed_precision, recipe, "mixed_precision", "no")
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"recipe mixed_precision {mixed_precision!r} must be one of {MIXED_PRECISION_CHOICES}")
    settings = TrainSettings(
        recipe=recipe,
        recipe_name=recipe["name"],
        task=task,
        model=model,
        model_config=dict(recipe.get("model_config") or {}),
        processor_config=dict(recipe.get("processor_config") or {}),
        dataset=dataset,
        dataset_options=dict(recipe.get("dataset_options") or {})
        if args.dataset in (None, recipe.get("dataset"))
        else {},
        train_split=args.train_split,
        eval_dataset=args.eval_dataset or dataset,
        eval_split=args.eval_split,
        output_dir=Path(args.output_dir),
        max_steps=args.max_steps if args.max_steps is not None else (None if args.epochs else recipe.get("max_steps")),
        epochs=args.epochs,
        per_device_batch_size=int(_pick(args.per_device_batch_size, recipe, "per_device_batch_size", 2)),
        gradient_accumulation_steps=_pick(args.gradient_accumulation_steps, recipe, "gradient_accumulation_steps"),
        total_batch_size=recipe.get("total_batch_size"),
        mixed_precision=mixed_precision,
        mixed_precision_explicit=args.mixed_precision is not None,
        optimizer=optimizer,
        schedule=dict(recipe.get("schedule") or {"name": "constant"}),
        gradient_clip_norm=recipe.get("gradient_clip_norm"),
        augmentation=dict(recipe.get("augmentation") or {}),
        eval_every=int(_pick(args.eval_every, recipe, "eval_every", 0)),
        num_eval_images=_pick(args.num_eval_images, recipe, "num_eval_images"),
        save_every=int(_pick(args.save_every, recipe, "save_every", 0)),
        keep_last=int(_pick(args.keep_last, recipe, "keep_last", 3)),
        log_every=int(_pick(args.log_every, recipe, "log_every", 20)),
        resume_from=args.resume_from,
        push_to_hub=args.push_to_hub,
        push_checkpoints=args.push_checkpoints,
        hub_private=args.hub_private,
        hub_token=args.hub_token,
        seed=int(_pick(args.seed, recipe, "seed", 42)),
        num_workers=int(_pick(args.num_workers, recipe, "num_workers", 0)),
        tensorboard=not args.no_tensorboard,
        progress=not args.no_progress,
        command=shlex.join(["accelerate launch -m mask2former.training.train", *(argv or [])]),
    )
    _validate(settings)
    return settings


def _validate(settings: TrainSettings) -> None:
    if settings.mixed_precision_explicit and settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a GPU; on a CPU use 'bf16' or 'no'")
    if settings.task not in TASKS:
        raise ValueError(f"recipe task {settings.task!r} must be one of {TASKS}")
    if settings.max_steps is None and settings.epochs is None:
        raise ValueError(f"recipe {settings.recipe_name!r} has no max_steps: pass --max-steps or --epochs")
    if settings.max_steps is not None and int(settings.max_steps) <= 0:
        raise ValueError(f"max_steps must be positive, got {settings.max_steps}")
    if settings.gradient_accumulation_steps is not None and int(settings.gradient_accumulation_steps) <= 0:
        raise ValueError(f"gradient_accumulation_steps must be positive, got {settings.gradient_accumulation_steps}")
    for name in ("dataset", "eval_dataset"):
        _validate_data_source(getattr(settings, name), f"--{name.replace('_', '-')}")
    if settings.model is not None:
        model_path = Path(settings.model)
        looks_local = settings.model.startswith((".", "/", "~")) or model_path.exists()
        if looks_local and not (model_path / "config.json").is_file():
            raise ValueError(
                f"--model {settings.model!r}: no config.json in that folder; give a save_pretrained folder, "
                "a hub_configs/<name> folder, or a Hub id"
            )
        if not looks_local:
            _validate_repo_id(settings.model, "--model")
    elif not settings.model_config:
        raise ValueError(f"recipe {settings.recipe_name!r} names no model: pass --model (a Hub id or a folder)")
    if settings.output_dir.exists() and not settings.output_dir.is_dir():
        raise ValueError(f"--output-dir {str(settings.output_dir)!r} exists and is not a folder")
    if settings.resume_from is not None and settings.resume_from != "latest":
        if not Path(settings.resume_from).is_dir():
            raise ValueError(
                f"--resume-from {settings.resume_from!r}: no such checkpoint folder; give a "
                f"{CHECKPOINTS_DIRNAME}/{CHECKPOINT_PREFIX}<step> folder or 'latest'"
            )
    if settings.push_to_hub is not None:
        _validate_repo_id(settings.push_to_hub, "--push-to-hub")
    elif settings.push_checkpoints:
        raise ValueError("--push-checkpoints needs --push-to-hub REPO_ID")
    for key in ("milestones",):
        if key in settings.schedule and not all(int(m) > 0 for m in settings.schedule[key]):
            raise ValueError(f"schedule {key} must be positive step numbers, got {settings.schedule[key]}")
    from .optim import lr_multiplier

    lr_multiplier(settings.schedule, 1)  # raises on an unknown schedule name
    if settings.optimizer.get("name", "adamw").lower() != "adamw":
        raise ValueError(f"optimizer name {settings.optimizer['name']!r} is not supported; use 'adamw'")


def _validate_repo_id(repo_id: str, option: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{option} {repo_id!r} is neither an existing folder nor a valid Hub id: {error}") from None


def _validate_data_source(source: str, option: str) -> None:
    if source == "synthetic-shapes":
        return
    path = Path(source)
    if source.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise ValueError(f"{option} {source!r}: no such folder (a COCO or ADE20K root is expected)")
        return
    _validate_repo_id(source, option)


# --------------------------------------------------------------------------------------------------------------------
# Model, processor, data
# --------------------------------------------------------------------------------------------------------------------
def build_processor(settings: TrainSettings):
    """The processor saved with the model: the starting model's, or one from the recipe's ``processor_config``."""
    from mask2former import Mask2FormerImageProcessor

    if settings.model is not None:
        model_path = Path(settings.model)
        if not model_path.is_dir() or (model_path / "preprocessor_config.json").is_file():
            processor = Mask2FormerImageProcessor.from_pretrained(settings.model)
            for key, value in settings.processor_config.items():
                setattr(processor, key, value)
            return processor
    return Mask2FormerImageProcessor(**settings.processor_config)


def build_model(settings: TrainSettings, label_info: dict[str, Any]):
    """Fine-tune from weights, or build from a config (a hub_configs folder or the recipe's ``model_config``).

    The class head follows the dataset's labels: a checkpoint trained on other classes gets a new, randomly
    initialised class head (``ignore_mismatched_sizes``).
    """
    from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    id2label = {int(k): v for k, v in label_info.id2label.items()}
    label_kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}, "num_labels": len(id2label)}
    if settings.model is not None:
        model_path = Path(settings.model)
        has_weights = not model_path.is_dir() or any(
            (model_path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
        )
        config = Mask2FormerConfig.from_pretrained(settings.model)
        for key, value in settings.model_config.items():
            setattr(config, key, value)
        if has_weights:
            same_labels = config.id2label == id2label
            config.id2label, config.label2id = label_kwargs["id2label"], label_kwargs["label2id"]
            return Mask2FormerForUniversalSegmentation.from_pretrained(
                settings.model, config=config, ignore_mismatched_sizes=not same_labels
            )
        config.id2label, config.label2id = label_kwargs["id2label"], label_kwargs["label2id"]
        return Mask2FormerForUniversalSegmentation(config)
    config = Mask2FormerConfig(**settings.model_config, **label_kwargs)
    return Mask2FormerForUniversalSegmentation(config)


class ShardedEpochSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices for one process: a seeded permutation per epoch, split across processes, resumable.

    The permutation depends only on ``(seed, epoch)``; process ``rank`` takes every ``num_replicas``-th index of it,
    so the ranks see disjoint images, and the last incomplete batch is dropped so every rank does the same number of
    steps. ``start_batch`` skips the batches already consumed (exact resume).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = (num_samples // num_replicas) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training images cannot fill one batch of {batch_size} on each of {num_replicas} "
                "processes; lower --per-device-batch-size or use more data"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        mine = order[self.rank :: self.num_replicas]
        for batch_index in range(self.start_batch, self.batches_per_epoch):
            yield [
                (self.epoch, index)
                for index in mine[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            ]


class SeededSampleDataset(torch.utils.data.Dataset):
    """Wraps a training dataset so each sample's augmentation draws from an RNG seeded by (seed, epoch, index).

    Indices are ``(epoch, index)`` pairs (from `ShardedEpochSampler`). The global ``random``, ``numpy`` and ``torch``
    RNGs are seeded for the duration of the item and restored afterwards, so augmentation is reproducible whatever
    process or worker computes it, and the training RNG stream (point sampling) is left untouched.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % (2**31)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def evaluate_model(
    model: Any,
    processor: Any,
    data: TrainingData,
    settings: TrainSettings,
    accelerator: Any,
    show_progress: bool = True,
) -> dict[str, float]:
    """Segment the evaluation set (sharded over the processes) and score it with the task's benchmark metric.

    Each process runs its share of the images through the model and the processor's post-processing at the images'
    own sizes and feeds the evaluator of training/evaluate.py, which gathers across processes once at the end.
    """
    from tqdm.auto import tqdm

    from .evaluate import build_evaluator

    evaluator = build_evaluator(settings.task, data.label_info, instance_ground_truth=data.instance_ground_truth)
    indices = list(range(len(data.eval_dataset)))[accelerator.process_index :: accelerator.num_processes]
    batch_size = settings.per_device_batch_size
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    was_training = model.training
    model.eval()
    for batch_indices in tqdm(
        batches, desc="evaluate", disable=not (accelerator.is_local_main_process and show_progress), leave=False
    ):
        batch = data.eval_collate_fn([data.eval_dataset[index] for index in batch_indices])
        targets = batch.pop("targets")
        target_sizes = [tuple(target["segment_map"].shape[-2:]) for target in targets]
        with torch.no_grad(), accelerator.autocast():
            outputs = model(
                pixel_values=batch["pixel_values"].to(accelerator.device),
                pixel_mask=batch["pixel_mask"].to(accelerator.device),
            )
        predictions = post_process(
            processor,
            outputs,
            settings.task,
            target_sizes,
            data.label_info,
            settings.recipe.get("inference"),
            pixel_mask=batch["pixel_mask"],
        )
        evaluator.update(predictions, targets)
    model.train(was_training)
    return evaluator.compute()


INFERENCE_DEFAULTS = {"threshold": 0.8, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8}


def post_process(
    processor: Any,
    outputs: Any,
    task: str,
    target_sizes: list[tuple[int, int]],
    label_info: Any,
    inference: dict[str, float] | None = None,
    pixel_mask: torch.Tensor | None = None,
):
    """The processor's post-processing for ``task`` at the images' sizes.

    ``inference`` (the recipe's ``inference`` dict) sets ``threshold`` (minimum class score of a kept segment),
    ``mask_threshold`` and ``overlap_mask_area_threshold``; the defaults are the paper's panoptic settings (0.8, 0.5,
    0.8). Instance evaluation keeps every query (AP ranks them by score), as the paper's inference does, as COCO
    RLEs so that overlapping instances survive. ``pixel_mask`` (B, H, W) gives the exact valid region of each image.
    """
    settings = {**INFERENCE_DEFAULTS, **(inference or {})}
    if task == "semantic":
        return processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes, pixel_mask=pixel_mask)
    if task == "instance":
        return processor.post_process_instance_segmentation(
            outputs,
            threshold=0.0,
            mask_threshold=settings["mask_threshold"],
            overlap_mask_area_threshold=0.0,
            return_coco_annotation=True,
            target_sizes=target_sizes,
            pixel_mask=pixel_mask,
        )
    return processor.post_process_panoptic_segmentation(
        outputs,
        threshold=settings["threshold"],
        mask_threshold=settings["mask_threshold"],
        overlap_mask_area_threshold=settings["overlap_mask_area_threshold"],
        label_ids_to_fuse=set(label_info.stuff_ids),  # one segment per stuff class, as the paper's inference
        target_sizes=target_sizes,
        pixel_mask=pixel_mask,
    )


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
class TrainingProgress:
    """Counters saved in every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches consumed by each process

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_step": self.micro_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir/checkpoints`` (temporary folders excluded), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def resolve_resume_path(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """``'latest'`` → the newest complete checkpoint in ``output_dir`` (None when there is none yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    return Path(resume_from)


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
def _make_accelerator(settings: TrainSettings):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    mixed_precision = settings.mixed_precision
    if on_cpu and mixed_precision == "fp16":
        if settings.mixed_precision_explicit:
            raise ValueError("--mixed-precision fp16 needs a GPU; on a CPU use 'bf16' or 'no'")
        mixed_precision = "no"  # the recipe's GPU setting; fp16 autocast does not exist on CPUs
    log_with = None
    if settings.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    accelerator = Accelerator(
        cpu=on_cpu,  # makes `accelerate launch --multi_gpu --num_processes N` give N gloo ranks without a GPU
        mixed_precision=mixed_precision,
        log_with=log_with,
        # Backbones keep parameters that segmentation does not use (Swin's final pooling LayerNorm, kept for
        # checkpoint compatibility); DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        project_config=ProjectConfiguration(
            project_dir=str(settings.output_dir), logging_dir=str(settings.output_dir / "logs")
        ),
    )
    return accelerator


def _move_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [item.to(device) for item in value]
        else:
            moved[key] = value
    return moved


def train(settings: TrainSettings) -> dict[str, Any]:
    """Run the training described by ``settings``; returns the final evaluation metrics (main process)."""
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm

    from . import hub
    from .optim import build_optimizer, build_scheduler

    accelerator = _make_accelerator(settings)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    log = accelerator.print
    log(
        f"mask2former train: recipe {settings.recipe_name}, {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type} ({accelerator.distributed_type}), mixed precision {accelerator.mixed_precision}"
    )

    # Weights are initialised from the seed identically on every rank (DDP also broadcasts them).
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    np.random.seed(settings.seed)

    processor = build_processor(settings)
    with accelerator.main_process_first():  # the main process generates/caches the data, the others then read it
        data = build_data(settings, processor)
    model = build_model(settings, data.label_info)
    num_parameters = sum(p.numel() for p in model.parameters())

    batch_size = settings.per_device_batch_size
    sampler = ShardedEpochSampler(
        len(data.train_dataset), batch_size, accelerator.num_processes, accelerator.process_index, settings.seed
    )
    accumulation = settings.gradient_accumulation_steps
    if accumulation is None:
        total = settings.total_batch_size
        accumulation = max(1, round(total / (batch_size * accelerator.num_processes))) if total else 1
    accumulation = int(accumulation)
    max_steps = settings.max_steps
    if max_steps is None:
        max_steps = max(1, settings.epochs * sampler.batches_per_epoch // accumulation)
    max_steps = int(max_steps)
    effective_batch = batch_size * accumulation * accelerator.num_processes

    optimizer = build_optimizer(model, settings.optimizer)
    scheduler = build_scheduler(optimizer, settings.schedule, max_steps)
    progress_state = TrainingProgress()
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it once per process).
    accelerator.register_for_checkpointing(scheduler, progress_state)

    resume_path = resolve_resume_path(settings.resume_from, settings.output_dir)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        log(f"resumed from {resume_path} at step {progress_state.step}")
    elif settings.resume_from == "latest":
        log(f"--resume-from latest: no checkpoint in {settings.output_dir}, starting from scratch")

    run_info = {
        "recipe": settings.recipe_name,
        "task": settings.task,
        "dataset": settings.dataset,
        "model": settings.model,
        "num_parameters": num_parameters,
        "num_processes": accelerator.num_processes,
        "per_device_batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": effective_batch,
        "max_steps": max_steps,
        "mixed_precision": accelerator.mixed_precision,
        "command": settings.command,
    }
    if accelerator.is_main_process:
        (settings.output_dir / "run_info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    if accelerator.log_with:
        tracker_config = {k: v for k, v in run_info.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("mask2former", config=tracker_config)

    train_dataset = SeededSampleDataset(data.train_dataset, settings.seed)
    loader_generator = torch.Generator()

    def batches_from(micro_step: int) -> Iterator[dict[str, Any]]:
        epoch, start = divmod(micro_step, sampler.batches_per_epoch)
        while True:
            sampler.set_epoch(epoch, start)
            loader_generator.manual_seed(settings.seed + epoch)  # worker seeds never touch the global RNG
            loader = torch.utils.data.DataLoader(
                train_dataset,
                batch_sampler=sampler,
                collate_fn=data.collate_fn,
                num_workers=settings.num_workers,
                generator=loader_generator,
                persistent_workers=False,
            )
            yield from loader
            epoch, start = epoch + 1, 0

    def save_checkpoint() -> Path:
        step = progress_state.step
        root = settings.output_dir / CHECKPOINTS_DIRNAME
        final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
        temporary = root / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))  # every rank writes its RNG state
        state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every rank calls it
        if accelerator.is_main_process:
            hub.save_model(
                accelerator.unwrap_model(model),
                processor,
                temporary / PRETRAINED_DIRNAME,
                card=hub.ModelCardInfo(**_card_fields(settings, run_info, latest_metrics, step)),
                state_dict=state_dict,
            )
            (temporary / "trainer_state.json").write_text(
                json.dumps({"step": step, "metrics": latest_metrics, **run_info}, indent=2) + "\n"
            )
            if final.exists():  # a re-run of the same step: replace the older copy
                shutil.rmtree(final)
            os.replace(temporary, final)  # atomic: a killed run never leaves a checkpoint resume would pick
            for old in list_checkpoints(settings.output_dir)[: -settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            if settings.push_checkpoints:
                hub.push_folder(
                    final / PRETRAINED_DIRNAME,
                    settings.push_to_hub,
                    token=settings.hub_token,
                    private=settings.hub_private,
                    commit_message=f"checkpoint at step {step}",
                )
        accelerator.wait_for_everyone()
        log(f"saved {final}")
        return final

    def run_evaluation() -> dict[str, float]:
        # DDP: the plain module (a no-grad DDP forward may still broadcast buffers, which would hang a rank with
        # fewer images); FSDP / DeepSpeed: the wrapper, which gathers the sharded weights.
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        eval_model = model if sharded else accelerator.unwrap_model(model)
        model.eval()
        metrics = evaluate_model(eval_model, processor, data, settings, accelerator, show_progress=settings.progress)
        model.train()
        if accelerator.is_main_process:
            with open(settings.output_dir / "eval_log.jsonl", "a") as handle:
                handle.write(json.dumps({"step": progress_state.step, **metrics}) + "\n")
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, progress_state.step
        )
        return metrics

    # The paper trains without a padding mask (padding is seen as content; the losses use the padded targets); the
    # model's exact padding invariance costs one backbone call per distinct image size, so it is opt-in here.
    train_with_pixel_mask = bool(settings.recipe.get("train_with_pixel_mask", False))
    latest_metrics: dict[str, float] = {}
    model.train()
    batches = batches_from(progress_state.micro_step)
    progress_bar = tqdm(
        total=max_steps,
        initial=progress_state.step,
        desc="train",
        disable=not (accelerator.is_local_main_process and settings.progress),
        dynamic_ncols=True,
    )
    log_path = settings.output_dir / "train_log.jsonl"
    window_losses: dict[str, float] = {}
    window_count, window_start = 0, time.perf_counter()
    while progress_state.step < max_steps:
        step_losses: dict[str, float] = {}
        for micro in range(accumulation):
            batch = _move_to_device(next(batches), accelerator.device)
            if not train_with_pixel_mask:
                batch.pop("pixel_mask", None)
            progress_state.micro_step += 1
            last = micro == accumulation - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            context = accelerator.no_sync(model) if not last else _null_context()
            with context:
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss / accumulation)
            step_losses["loss"] = step_losses.get("loss", 0.0) + loss.detach().float().item() / accumulation
            for name in ("loss_cross_entropy", "loss_mask", "loss_dice"):
                value = (outputs.loss_dict or {}).get(name) if hasattr(outputs, "loss_dict") else None
                if value is not None:
                    step_losses[name] = step_losses.get(name, 0.0) + float(value.detach()) / accumulation
        if not math.isfinite(step_losses["loss"]):
            raise FloatingPointError(f"loss is {step_losses['loss']} at step {progress_state.step}; lower --lr?")
        if settings.gradient_clip_norm:
            accelerator.clip_grad_norm_(model.parameters(), float(settings.gradient_clip_norm))
        step_lr = scheduler.get_last_lr()[0]  # the rate this step used (first group)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress_state.step += 1
        progress_bar.update(1)
        for name, value in step_losses.items():
            window_losses[name] = window_losses.get(name, 0.0) + value
        window_count += 1

        step = progress_state.step
        if step % settings.log_every == 0 or step == max_steps:
            averaged = torch.tensor([window_losses[name] / window_count for name in sorted(window_losses)])
            averaged = accelerator.reduce(averaged.to(accelerator.device), reduction="mean").cpu().tolist()
            record = dict(zip(sorted(window_losses), averaged))
            record.update(
                step=step,
                lr=step_lr,
                images_per_second=window_count * effective_batch / max(1e-9, time.perf_counter() - window_start),
            )
            if accelerator.is_main_process:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
            progress_bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            window_losses, window_count, window_start = {}, 0, time.perf_counter()
        if settings.eval_every and step % settings.eval_every == 0 and step < max_steps:
            latest_metrics = run_evaluation()
            log(f"step {step}: {json.dumps(_headline(latest_metrics))}")
        if settings.save_every and step % settings.save_every == 0:
            save_checkpoint()
    progress_bar.close()

    latest_metrics = run_evaluation()
    log(f"final evaluation: {json.dumps(_headline(latest_metrics))}")
    final_dir = settings.output_dir / "model"
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        (settings.output_dir / "metrics.json").write_text(json.dumps(latest_metrics, indent=2) + "\n")
        temporary = settings.output_dir / f"{TMP_PREFIX}model"
        shutil.rmtree(temporary, ignore_errors=True)
        hub.save_model(
            accelerator.unwrap_model(model),
            processor,
            temporary,
            card=hub.ModelCardInfo(**_card_fields(settings, run_info, latest_metrics, progress_state.step)),
            state_dict=state_dict,
        )
        (temporary / "metrics.json").write_text(json.dumps(latest_metrics, indent=2) + "\n")
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(temporary, final_dir)
        log(f"saved the model to {final_dir}")
        if settings.push_to_hub:
            url = hub.push_folder(
                final_dir,
                settings.push_to_hub,
                token=settings.hub_token,
                private=settings.hub_private,
                commit_message=f"Mask2Former trained with recipe {settings.recipe_name} ({progress_state.step} steps)",
            )
            log(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return latest_metrics


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("PQ", "SQ", "RQ", "AP", "mIoU", "pq", "ap", "miou")
    chosen = {k: round(v, 2) for k, v in metrics.items() if k in keys and isinstance(v, (int, float))}
    return chosen or {k: v for k, v in list(metrics.items())[:6]}


def _card_fields(settings: TrainSettings, run_info: dict[str, Any], metrics: dict[str, Any], step: int) -> dict:
    return {
        "recipe": settings.recipe,
        "dataset": settings.dataset,
        "task": settings.task,
        "metrics": dict(metrics),
        "command": settings.command,
        "steps": step,
        "base_model": settings.model,
        "run_info": dict(run_info),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate (before any work), train. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve_settings(args, argv)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2 and the message naming the bad value
    train(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
