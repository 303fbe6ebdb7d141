"""Train Mask2Former with Accelerate: the paper's recipes, checkpoints with exact resume, evaluation, Hub push.

Run it as::

    accelerate launch -m mask2former.training.train --recipe coco-panoptic-swin-t --dataset /data/coco \\
        --output-dir runs/swin-t --push-to-hub me/mask2former-swin-t-coco-panoptic
    python -m mask2former.training.train --recipe synthetic-shapes-demo --output-dir runs/demo   # one process

On a machine without a GPU, ``accelerate launch --multi_gpu --num_processes 2 -m mask2former.training.train ...``
gives two CPU ranks talking over gloo: the script creates its ``Accelerator`` with ``cpu=True`` whenever CUDA is not
available (``accelerate launch --cpu --num_processes 2`` starts a single process).

The settings come from ``training/settings.py`` (recipe + command line), the model from ``build_model.py``, the data
from ``build_data.py``, the data order from ``sampling.py``, checkpoints from ``checkpoints.py`` and the evaluation
from ``evaluate.py``. What is left here is the loop (one optimizer step = ``accumulation`` micro-batches per process):

    data (sharded, seeded per epoch) -> model(**batch).loss -> backward (DDP sync on the last micro-batch)
    -> clip the full model's gradient norm -> AdamW step -> LR schedule step
    -> every ``log_every``: tensorboard + ``train_log.jsonl``; every ``eval_every``: PQ / AP / mIoU
    -> every ``save_every``: a checkpoint, keeping the last ``keep_last``.

Resume is exact: the data order depends only on (seed, epoch, position), the per-sample augmentation randomness only
on (seed, epoch, sample index), and the optimizer, scheduler, step counters and every process's RNG states are in the
checkpoint, so N steps + resume + N steps gives the weights of 2N uninterrupted steps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils.optional import require
from . import hub
from .build_data import TrainingData, build_data
from .build_model import build_model, build_processor, model_family
from .checkpoints import TrainingProgress, resolve_resume_path, save_checkpoint, save_final_model
from .evaluate import EvaluationSet, evaluate_model
from .optim import build_optimizer, build_scheduler
from .sampling import SeededSampleDataset, ShardedEpochSampler, epoch_batches
from .settings import TrainSettings, build_parser, gradient_accumulation_steps, parse_arguments, resolve_settings

logger = logging.getLogger(__name__)

accelerate = require("accelerate", "training")  # the train extra; this module is the feature that needs it
accelerate_utils = require("accelerate.utils", "training")

# loss_dict's last-layer terms (``<term>_<i>`` are the auxiliary predictions': summed into the loss, not logged)
_AUXILIARY_TERM = re.compile(r"_\d+$")


def make_accelerator(settings: TrainSettings) -> Any:
    """The run's ``Accelerator``: CPU ranks (gloo) without CUDA, tensorboard when it is installed."""
    on_cpu = not torch.cuda.is_available()
    log_with = "tensorboard" if settings.tensorboard and importlib.util.find_spec("tensorboard") else None
    return accelerate.Accelerator(
        cpu=on_cpu,  # makes `accelerate launch --multi_gpu --num_processes N` give N gloo ranks without a GPU
        mixed_precision=settings.mixed_precision,
        log_with=log_with,
        # Backbones keep parameters that segmentation does not use (Swin's final pooling LayerNorm, kept for
        # checkpoint compatibility); DDP must not wait for their gradients.
        kwargs_handlers=[accelerate_utils.DistributedDataParallelKwargs(find_unused_parameters=True)],
        project_config=accelerate_utils.ProjectConfiguration(
            project_dir=str(settings.output_dir), logging_dir=str(settings.output_dir / "logs")
        ),
    )


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


class LossWindow:
    """The loss terms of the steps since the last log, summed on the device (no host sync until `average`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self.start = time.perf_counter()
        self.skip_reasons: list[str] = []  # bad examples this process replaced in the window's batches

    def add(self, outputs: Any, weight: float) -> None:
        """Add one micro-batch's ``loss`` and last-layer ``loss_dict`` terms, scaled by ``weight``."""
        terms = {
            "loss": outputs.loss,
            **{k: v for k, v in (outputs.loss_dict or {}).items() if not _AUXILIARY_TERM.search(k)},
        }
        for name, value in terms.items():
            value = value.detach().float() * weight
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def check_finite(self, step: int) -> None:
        """Raises when a loss of the window is not finite (a host sync: call it before saving a checkpoint)."""
        if self.sums and not bool(torch.stack(list(self.sums.values())).isfinite().all()):
            raise FloatingPointError(f"the loss is not finite in the steps up to {step}; lower --lr?")

    def average(self, accelerator: Any) -> dict[str, float]:
        """Per-step averages over the window and the processes; the one host sync of the window."""
        names = sorted(self.sums)
        averaged = torch.stack([self.sums[name] for name in names]) / self.num_steps
        return dict(zip(names, accelerator.reduce(averaged, reduction="mean").cpu().tolist()))


def _log_step(accelerator: Any, window: LossWindow, step: int, lr: float, images_per_step: int, path: Path) -> dict:
    record = window.average(accelerator)
    if not all(np.isfinite(value) for value in record.values()):
        raise FloatingPointError(f"loss is {record['loss']} in the {window.num_steps} steps up to {step}; lower --lr?")
    seconds = max(1e-9, time.perf_counter() - window.start)
    for reason in window.skip_reasons:  # every process names its own
        logger.warning("step %d: skipped a bad example: %s", step, reason)
    count = torch.tensor(len(window.skip_reasons), device=accelerator.device)
    skipped = int(accelerator.reduce(count, reduction="sum"))
    record.update(
        step=step, lr=lr, images_per_second=window.num_steps * images_per_step / seconds, skipped_examples=skipped
    )
    if accelerator.is_main_process:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
    return record


def _evaluate(
    accelerator: Any, model: Any, processor: Any, data: TrainingData, settings: TrainSettings, step: int
) -> dict[str, float]:
    """Evaluate, append to ``eval_log.jsonl`` and the trackers; the model is back in training mode after."""
    # DDP: the plain module (a no-grad DDP forward may still broadcast buffers, which would hang a rank with fewer
    # images); FSDP / DeepSpeed: the wrapper, which gathers the sharded weights.
    sharded = accelerator.distributed_type in (
        accelerate_utils.DistributedType.FSDP,
        accelerate_utils.DistributedType.DEEPSPEED,
    )
    evaluation = EvaluationSet(
        data.eval_dataset, data.eval_collate_fn, settings.task, data.label_info, data.instance_ground_truth
    )
    metrics = evaluate_model(
        model if sharded else accelerator.unwrap_model(model),
        processor,
        evaluation,
        batch_size=settings.per_device_batch_size,
        inference=settings.inference,
        accelerator=accelerator,
        show_progress=settings.progress,
    )
    if accelerator.is_main_process:
        with open(settings.output_dir / "eval_log.jsonl", "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
    return metrics


def _card(settings: TrainSettings, run_info: dict[str, Any], metrics: dict[str, Any], step: int) -> hub.ModelCardInfo:
    return hub.ModelCardInfo(
        recipe=settings.resolved_recipe(),
        dataset=settings.dataset,
        task=settings.task,
        metrics=dict(metrics),
        command=settings.command,
        steps=step,
        base_model=settings.model,
        run_info=dict(run_info),
    )


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("PQ", "SQ", "RQ", "AP", "mIoU")
    chosen = {k: round(v, 2) for k, v in metrics.items() if k in keys and isinstance(v, (int, float))}
    return chosen or {k: v for k, v in list(metrics.items())[:6]}


def train(settings: TrainSettings) -> dict[str, float]:
    """Run the training described by ``settings``; returns the final evaluation metrics."""
    accelerator = make_accelerator(settings)
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
    if data.skipped:  # on_bad_input="skip": each is named in a warning by the data loader
        log(f"{len(data.skipped)} bad example(s) left out of the data while listing it; the first: {data.skipped[0]}")
    model = build_model(settings, data.label_info)
    family = model_family(settings)
    num_parameters = sum(p.numel() for p in model.parameters())

    batch_size = settings.per_device_batch_size
    sampler = ShardedEpochSampler(
        len(data.train_dataset), batch_size, accelerator.num_processes, accelerator.process_index, settings.seed
    )
    accumulation = gradient_accumulation_steps(settings, accelerator.num_processes)
    max_steps = settings.max_steps or max(1, settings.epochs * sampler.batches_per_epoch // accumulation)
    images_per_step = batch_size * accumulation * accelerator.num_processes

    optimizer = build_optimizer(model, settings.optimizer, backbone_prefix=family.backbone_prefix)
    scheduler = build_scheduler(optimizer, settings.schedule, max_steps)
    progress = TrainingProgress()
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it once per process).
    accelerator.register_for_checkpointing(scheduler, progress)
    resume_path = resolve_resume_path(settings.resume_from, settings.output_dir)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        log(f"resumed from {resume_path} at step {progress.step}")
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
        "effective_batch_size": images_per_step,
        "max_steps": max_steps,
        "mixed_precision": accelerator.mixed_precision,
        "command": settings.command,
        "bad_examples_left_out": len(data.skipped),
    }
    if accelerator.is_main_process:
        (settings.output_dir / "run_info.json").write_text(json.dumps(run_info, indent=2) + "\n")
    if accelerator.log_with:
        accelerator.init_trackers("mask2former", config={k: v for k, v in run_info.items() if v is not None})

    batches = epoch_batches(
        SeededSampleDataset(data.train_dataset, settings.seed),
        sampler,
        data.collate_fn,
        settings.num_workers,
        settings.seed,
        start_micro_step=progress.micro_step,
    )
    progress_bar = tqdm(
        total=max_steps,
        initial=progress.step,
        desc="train",
        disable=not (accelerator.is_local_main_process and settings.progress),
        dynamic_ncols=True,
    )
    metrics: dict[str, float] = {}
    window = LossWindow()
    model.train()
    while progress.step < max_steps:
        for micro in range(accumulation):
            batch = next(batches)
            window.skip_reasons.extend(batch.pop("skipped", []))  # reported by the collator, also from workers
            batch = _move_to_device(batch, accelerator.device)
            if not settings.train_with_pixel_mask:
                batch.pop("pixel_mask", None)
            progress.micro_step += 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            last = micro == accumulation - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss / accumulation)
            window.add(outputs, 1 / accumulation)
        if settings.gradient_clip_norm:
            accelerator.clip_grad_norm_(model.parameters(), float(settings.gradient_clip_norm))
        lr = scheduler.get_last_lr()[0]  # the rate this step used (first group)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        window.num_steps += 1
        progress_bar.update(1)

        step = progress.step
        if step % settings.log_every == 0 or step == max_steps:
            record = _log_step(accelerator, window, step, lr, images_per_step, settings.output_dir / "train_log.jsonl")
            progress_bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            window = LossWindow()
        if settings.eval_every and step % settings.eval_every == 0 and step < max_steps:
            metrics = _evaluate(accelerator, model, processor, data, settings, step)
            log(f"step {step}: {json.dumps(_headline(metrics))}")
        if settings.save_every and step % settings.save_every == 0:
            window.check_finite(step)  # never checkpoint a diverged model
            trainer_state = {"metrics": metrics, **run_info}
            card = _card(settings, run_info, metrics, step)
            path = save_checkpoint(
                accelerator, model, processor, settings.output_dir, step, settings.keep_last, card, trainer_state
            )
            if settings.push_checkpoints and accelerator.is_main_process:
                hub.push_folder(
                    path / "pretrained",
                    settings.push_to_hub,
                    token=settings.hub_token,
                    private=settings.hub_private,
                    commit_message=f"checkpoint at step {step}",
                )
            log(f"saved {path}")
    progress_bar.close()

    metrics = _evaluate(accelerator, model, processor, data, settings, progress.step)
    log(f"final evaluation: {json.dumps(_headline(metrics))}")
    if accelerator.is_main_process:
        (settings.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    card = _card(settings, run_info, metrics, progress.step)
    final_dir = save_final_model(accelerator, model, processor, settings.output_dir, card, metrics)
    log(f"saved the model to {final_dir}")
    if settings.push_to_hub and accelerator.is_main_process:
        url = hub.push_folder(
            final_dir,
            settings.push_to_hub,
            token=settings.hub_token,
            private=settings.hub_private,
            commit_message=f"{family.model_class.__name__} trained with recipe {settings.recipe_name} "
            f"({progress.step} steps)",
        )
        log(f"pushed to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate (before any work), train. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = parse_arguments(argv)  # exits with status 2 on a malformed option
    try:
        settings = resolve_settings(arguments)
    except ValueError as error:
        build_parser().error(str(error))  # exits with status 2 and the message naming the bad value
    train(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
