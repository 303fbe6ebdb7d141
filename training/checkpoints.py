"""Checkpoints of a run: written atomically, the last ``keep_last`` kept, found again for an exact resume.

Layout of ``<output-dir>/checkpoints/checkpoint-<step:08d>/``: accelerate's state (model, optimizer, the registered
scheduler and `TrainingProgress`, every process's RNG states), ``pretrained/`` (a ``save_pretrained`` model folder
with the processor and a model card) and ``trainer_state.json``. A checkpoint is written into ``.tmp-checkpoint-*``
and renamed once complete, so a run killed while saving never leaves a folder that resume would pick. The final model
goes to ``<output-dir>/model`` the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import hub

CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
PRETRAINED_DIRNAME = "pretrained"
FINAL_MODEL_DIRNAME = "model"


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
    """``'latest'`` -> the newest complete checkpoint in ``output_dir`` (None when there is none yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    return Path(resume_from)


def _replace(temporary: Path, final: Path) -> None:
    """Put the complete folder ``temporary`` in the place of ``final`` (rename: atomic on one file system)."""
    if final.exists():  # a re-run of the same step: replace the older copy
        shutil.rmtree(final)
    os.replace(temporary, final)


def save_checkpoint(
    accelerator: Any,
    model: Any,
    processor: Any,
    output_dir: Path,
    step: int,
    keep_last: int,
    card: hub.ModelCardInfo,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` (every process calls this) and prune to the last ``keep_last``.

    Returns:
        The checkpoint folder.
    """
    root = output_dir / CHECKPOINTS_DIRNAME
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
            card=card,
            state_dict=state_dict,
        )
        (temporary / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        _replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final_model(
    accelerator: Any, model: Any, processor: Any, output_dir: Path, card: hub.ModelCardInfo, metrics: dict[str, Any]
) -> Path:
    """Write ``<output_dir>/model`` (weights, processor, card, ``metrics.json``); every process calls this."""
    final = output_dir / FINAL_MODEL_DIRNAME
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        temporary = output_dir / f"{TMP_PREFIX}{FINAL_MODEL_DIRNAME}"
        shutil.rmtree(temporary, ignore_errors=True)
        hub.save_model(accelerator.unwrap_model(model), processor, temporary, card=card, state_dict=state_dict)
        (temporary / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _replace(temporary, final)
    accelerator.wait_for_everyone()
    return final
