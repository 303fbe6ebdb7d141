"""Recipes and the command line -> one `TrainSettings`: loaded, merged, resolved and checked before any work starts.

A recipe (``training/recipes/<name>.json``) holds every training hyper-parameter (DESIGN.md, decision 7); the
command line (`TrainArguments`, a value of ``None`` meaning "the recipe's") overrides it. :func:`resolve_settings`
merges the two into `TrainSettings`, the only thing the trainer reads: every recipe key is resolved into one of its
fields (an unknown key is an error), so nothing past this module looks at a raw recipe.

Example::

    from mask2former.training.settings import TrainArguments, resolve_settings
    from mask2former.training.train import train

    settings = resolve_settings(TrainArguments(recipe="tiny-test", output_dir="runs/tiny", max_steps=2))
    metrics = train(settings)
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..processing.tasks import INFERENCE_DEFAULTS, TASKS, check_task, inference_settings
from .optim import lr_multiplier

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
DEFAULT_RECIPE = "synthetic-shapes-demo"
COMMAND = "accelerate launch -m mask2former.training.train"
# Short aliases people type for the paper's backbones.
_RECIPE_ALIASES = {"swin-tiny": "swin-t", "swin-small": "swin-s", "swin-base": "swin-b", "swin-large": "swin-l"}
# Every key a recipe may hold; each is resolved into a TrainSettings field.
RECIPE_KEYS = frozenset({
    "name", "description", "task", "model", "model_config", "processor_config", "dataset", "dataset_options",
    "max_steps", "total_batch_size", "per_device_batch_size", "gradient_accumulation_steps", "optimizer",
    "gradient_clip_norm", "schedule", "mixed_precision", "augmentation", "inference", "train_with_pixel_mask",
    "eval_every", "save_every", "keep_last", "log_every", "num_eval_images", "seed", "num_workers",
})  # fmt: skip


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``training/recipes/``."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Load a recipe by name (``coco-panoptic-swin-t``) or from a JSON file path.

    Raises:
        ValueError: unknown name (the message lists the available ones), a file that is not a JSON object, or a key
            that is not a recipe key.
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
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"--recipe {str(path)!r}: unknown keys {unknown}; a recipe holds {sorted(RECIPE_KEYS)}")
    recipe.setdefault("name", path.stem)
    return recipe


@dataclass
class TrainArguments:
    """The command line's values (`build_parser`'s options); ``None`` takes the recipe's value."""

    output_dir: str | Path
    recipe: str = DEFAULT_RECIPE
    model: str | None = None
    dataset: str | None = None
    train_split: str | None = None
    eval_dataset: str | None = None
    eval_split: str | None = None
    task: str | None = None
    max_steps: int | None = None
    epochs: int | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    mixed_precision: str | None = None
    lr: float | None = None
    eval_every: int | None = None
    num_eval_images: int | None = None
    save_every: int | None = None
    keep_last: int | None = None
    log_every: int | None = None
    resume_from: str | None = None
    push_to_hub: str | None = None
    push_checkpoints: bool = False
    hub_private: bool = False
    hub_token: str | None = None
    seed: int | None = None
    num_workers: int | None = None
    tensorboard: bool = True
    progress: bool = True
    on_bad_input: str = "skip"
    command: str = ""  # the command line that asked for the run, recorded in run_info.json and the model card


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
        prog=COMMAND,
        description="Train Mask2Former with a recipe (the paper's settings by name); arguments override the recipe. "
        "CPU-only machines: accelerate launch --multi_gpu --num_processes 2 -m mask2former.training.train ... "
        "runs two gloo ranks.",
    )
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"recipe name or .json path (default: {DEFAULT_RECIPE}); shipped: {', '.join(available_recipes())}",
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
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="do not log to tensorboard (train_log.jsonl is always written)",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide the tqdm progress bar (it is shown on the main process)",
    )
    parser.add_argument(
        "--on-bad-input",
        choices=("skip", "raise"),
        default="skip",
        help="an unreadable image or label: skip it, counted in the log (default), or stop the run ('raise')",
    )
    return parser


def parse_arguments(argv: list[str]) -> TrainArguments:
    """``argv`` (without the program name) -> `TrainArguments`; exits with status 2 on a malformed option."""
    return TrainArguments(**vars(build_parser().parse_args(argv)), command=shlex.join([COMMAND, *argv]))


@dataclass
class TrainSettings:
    """The recipe merged with the command line: everything one run needs, resolved and validated.

    ``mixed_precision`` is the one used (a recipe's fp16 is "no" on a CPU); ``inference`` holds the post-processing
    thresholds of ``task`` (the recipe's over `mask2former.processing.tasks.INFERENCE_DEFAULTS`).
    """

    recipe_name: str
    description: str
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
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    gradient_clip_norm: float | None
    augmentation: dict[str, Any]
    inference: dict[str, float]
    train_with_pixel_mask: bool
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
    on_bad_input: str = "skip"  # "skip": a bad example is replaced and counted in the log; "raise": the run stops

    def resolved_recipe(self) -> dict[str, Any]:
        """The recipe this run used (the command line's overrides applied): what the model card and run_info show."""
        recipe_fields = {
            "model_config", "processor_config", "dataset", "dataset_options", "task", "model", "max_steps",
            "total_batch_size", "per_device_batch_size", "gradient_accumulation_steps", "optimizer",
            "gradient_clip_norm", "schedule", "mixed_precision", "augmentation", "inference", "train_with_pixel_mask",
            "eval_every", "save_every", "keep_last", "log_every", "num_eval_images", "seed", "num_workers",
        }  # fmt: skip
        values = {key: value for key, value in asdict(self).items() if key in recipe_fields}
        return {"name": self.recipe_name, "description": self.description, **values}


def _pick(arg_value: Any, recipe: dict[str, Any], key: str, default: Any = None) -> Any:
    value = arg_value if arg_value is not None else recipe.get(key)
    return default if value is None else value


def _resolve_mixed_precision(asked: str | None, recipe: dict[str, Any]) -> str:
    """The autocast dtype used: fp16 exists only on a GPU, so a recipe's fp16 runs as "no" on a CPU."""
    mixed_precision = _pick(asked, recipe, "mixed_precision", "no")
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"recipe mixed_precision {mixed_precision!r} must be one of {MIXED_PRECISION_CHOICES}")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        if asked is not None:
            raise ValueError("--mixed-precision fp16 needs a GPU; on a CPU use 'bf16' or 'no'")
        return "no"
    return mixed_precision


def resolve_settings(arguments: TrainArguments) -> TrainSettings:
    """Merge the recipe and the arguments and check every value, before any model or data is loaded.

    Raises:
        ValueError: a value that cannot work, with the option's name and the fix in the message.
    """
    recipe = load_recipe(arguments.recipe)
    optimizer = dict(recipe.get("optimizer") or {})
    if arguments.lr is not None:
        optimizer["lr"] = arguments.lr
    if "lr" not in optimizer:
        raise ValueError(f"recipe {recipe['name']!r} has no optimizer.lr; add it or pass --lr")
    optimizer.setdefault("weight_decay", 0.0)
    task = check_task(_pick(arguments.task, recipe, "task", "panoptic"))
    dataset = _pick(arguments.dataset, recipe, "dataset")
    if not dataset:
        raise ValueError(
            f"recipe {recipe['name']!r} names no dataset: pass --dataset (a COCO/ADE20K folder, a Hub id, or "
            "'synthetic-shapes')"
        )
    inference = recipe.get("inference") or {}
    unknown = sorted(set(inference) - set(INFERENCE_DEFAULTS["panoptic"]))
    if unknown:
        raise ValueError(f"recipe inference keys {unknown} are unknown; use {sorted(INFERENCE_DEFAULTS['panoptic'])}")
    max_steps = arguments.max_steps
    if max_steps is None and arguments.epochs is None:
        max_steps = recipe.get("max_steps")
    settings = TrainSettings(
        recipe_name=recipe["name"],
        description=str(recipe.get("description", "")),
        task=task,
        model=_pick(arguments.model, recipe, "model"),
        model_config=dict(recipe.get("model_config") or {}),
        processor_config=dict(recipe.get("processor_config") or {}),
        dataset=dataset,
        # the recipe's dataset options describe the recipe's dataset, not one given instead of it
        dataset_options=dict(recipe.get("dataset_options") or {})
        if arguments.dataset in (None, recipe.get("dataset"))
        else {},
        train_split=arguments.train_split,
        eval_dataset=arguments.eval_dataset or dataset,
        eval_split=arguments.eval_split,
        output_dir=Path(arguments.output_dir),
        max_steps=max_steps,
        epochs=arguments.epochs,
        per_device_batch_size=int(_pick(arguments.per_device_batch_size, recipe, "per_device_batch_size", 2)),
        gradient_accumulation_steps=_pick(
            arguments.gradient_accumulation_steps, recipe, "gradient_accumulation_steps"
        ),
        total_batch_size=recipe.get("total_batch_size"),
        mixed_precision=_resolve_mixed_precision(arguments.mixed_precision, recipe),
        optimizer=optimizer,
        schedule=dict(recipe.get("schedule") or {"name": "constant"}),
        gradient_clip_norm=recipe.get("gradient_clip_norm"),
        augmentation=dict(recipe.get("augmentation") or {}),
        # the recipe's thresholds are those of its own task
        inference=inference_settings(task, inference if task == recipe.get("task", task) else None),
        # The paper trains without a padding mask (padding is seen as content; the losses use the padded targets);
        # the model's exact padding invariance costs one backbone call per distinct image size, so it is opt-in.
        train_with_pixel_mask=bool(recipe.get("train_with_pixel_mask", False)),
        eval_every=int(_pick(arguments.eval_every, recipe, "eval_every", 0)),
        num_eval_images=_pick(arguments.num_eval_images, recipe, "num_eval_images"),
        save_every=int(_pick(arguments.save_every, recipe, "save_every", 0)),
        keep_last=int(_pick(arguments.keep_last, recipe, "keep_last", 3)),
        log_every=int(_pick(arguments.log_every, recipe, "log_every", 20)),
        resume_from=arguments.resume_from,
        push_to_hub=arguments.push_to_hub,
        push_checkpoints=arguments.push_checkpoints,
        hub_private=arguments.hub_private,
        hub_token=arguments.hub_token,
        seed=int(_pick(arguments.seed, recipe, "seed", 42)),
        num_workers=int(_pick(arguments.num_workers, recipe, "num_workers", 0)),
        tensorboard=arguments.tensorboard,
        progress=arguments.progress,
        command=arguments.command,
        on_bad_input=arguments.on_bad_input,
    )
    _validate(settings)
    return settings


def gradient_accumulation_steps(settings: TrainSettings, num_processes: int) -> int:
    """Micro-batches per optimizer step: the settings' own, or what reaches ``total_batch_size`` when unset."""
    if settings.gradient_accumulation_steps is not None:
        return int(settings.gradient_accumulation_steps)
    total = settings.total_batch_size
    return max(1, round(total / (settings.per_device_batch_size * num_processes))) if total else 1


def _validate(settings: TrainSettings) -> None:
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
                "checkpoints/checkpoint-<step> folder or 'latest'"
            )
    if settings.push_to_hub is not None:
        _validate_repo_id(settings.push_to_hub, "--push-to-hub")
    elif settings.push_checkpoints:
        raise ValueError("--push-checkpoints needs --push-to-hub REPO_ID")
    for key in ("milestones",):
        if key in settings.schedule and not all(int(m) > 0 for m in settings.schedule[key]):
            raise ValueError(f"schedule {key} must be positive step numbers, got {settings.schedule[key]}")
    lr_multiplier(settings.schedule, 1)  # raises on an unknown schedule name
    if settings.optimizer.get("name", "adamw").lower() != "adamw":
        raise ValueError(f"optimizer name {settings.optimizer['name']!r} is not supported; use 'adamw'")


def _validate_repo_id(repo_id: str, option: str) -> None:
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
