"""processing/tasks.py: the task names, defined once and imported by every part that takes a task."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mask2former.processing.tasks import TASKS, check_task

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
