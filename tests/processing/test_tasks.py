"""processing/tasks.py: the task names, defined once and imported by every part that takes a task."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mask2former.processing.tasks import TASKS, check_task, inference_settings, post_process

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tasks_are_defined_once_in_the_package():
    literal = re.compile(r"""\(\s*["']panoptic["'],\s*["']instance["'],\s*["']semantic["']\s*\)""")
    skipped = {".venv", "build", "tests", "bench"}  # the package's code, not its tests and benchmark scripts
    sources = [path for path in REPO_ROOT.rglob("*.py") if not skipped & set(path.relative_to(REPO_ROOT).parts)]
    defining = sorted(str(path.relative_to(REPO_ROOT)) for path in sources if literal.search(path.read_text()))
    assert defining == ["processing/tasks.py"]


def test_check_task_names_the_wrong_task_and_the_choices():
    assert check_task("semantic") == "semantic" and set(TASKS) == {"panoptic", "instance", "semantic"}
    with pytest.raises(ValueError, match="'panoptik'; use one of panoptic, instance, semantic"):
        check_task("panoptik")


class _RecordingProcessor:
    """Stands in for an image processor: returns which post-processing ran and with what."""

    def __getattr__(self, name):
        if not name.startswith("post_process_"):
            raise AttributeError(name)
        return lambda outputs, **kwargs: (name, kwargs)


def test_post_process_dispatches_each_task_with_the_papers_inference_settings():
    processor, sizes = _RecordingProcessor(), [(4, 6)]
    name, kwargs = post_process(processor, None, "panoptic", sizes, label_ids_to_fuse=[3, 1])
    assert name == "post_process_panoptic_segmentation" and kwargs["label_ids_to_fuse"] == {1, 3}
    assert (kwargs["threshold"], kwargs["mask_threshold"], kwargs["overlap_mask_area_threshold"]) == (0.8, 0.5, 0.8)
    name, kwargs = post_process(processor, None, "instance", sizes)
    assert name == "post_process_instance_segmentation" and kwargs["return_coco_annotation"] is True
    assert (kwargs["threshold"], kwargs["overlap_mask_area_threshold"]) == (0.0, 0.0)  # every query, overlaps kept
    name, kwargs = post_process(
        processor, None, "instance", sizes, instance_format="binary_maps", inference={"threshold": 0.5}
    )
    assert kwargs["return_binary_maps"] is True and kwargs["return_coco_annotation"] is False
    assert kwargs["threshold"] == 0.5
    name, kwargs = post_process(processor, None, "semantic", sizes, inference={"threshold": 0.9})
    assert name == "post_process_semantic_segmentation" and set(kwargs) == {"target_sizes", "pixel_mask"}


def test_inference_settings_refuse_unknown_keys():
    assert inference_settings("panoptic", {"threshold": 0.5})["threshold"] == 0.5
    with pytest.raises(ValueError, match="'score_threshold'"):
        inference_settings("panoptic", {"score_threshold": 0.5})
    with pytest.raises(ValueError, match="instance_format"):
        post_process(_RecordingProcessor(), None, "instance", [(1, 1)], instance_format="png")
