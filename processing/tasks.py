"""The segmentation tasks, named once for the whole package.

Every part that takes a task (the data readers, the collator, the trainer, ``mask2former segment`` and
``mask2former evaluate``) imports ``TASKS`` from here, and :func:`check_task` gives one error message for a wrong one.
"""

from __future__ import annotations

TASKS: tuple[str, ...] = ("panoptic", "instance", "semantic")
# the video families' tasks (clips in, instance tubes out)
VIDEO_TASKS: tuple[str, ...] = ("video-instance",)


def check_task(task: str, tasks: tuple[str, ...] = TASKS) -> str:
    """Returns ``task`` if it is one of ``tasks``; raises a ``ValueError`` naming it and the choices otherwise."""
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(tasks)}")
    return task
