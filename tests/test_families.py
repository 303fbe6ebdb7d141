"""families.py: the model family of a config, found by model_type, and the consistency of every entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mask2former.families import FAMILIES, family_for, family_of
from mask2former.processing.tasks import TASKS, VIDEO_TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_entry_is_consistent(model_type):
    family = FAMILIES[model_type]
    assert family.model_type == model_type
    assert family.config_class.model_type == model_type  # what config.json carries and family_of reads
    assert issubclass(family.model_class.config_class, family.config_class) or family.model_class.config_class is (
        family.config_class
    )
    assert family.tasks and set(family.tasks) <= set(TASKS) | set(VIDEO_TASKS)
    for task in family.tasks:  # the one task dispatch calls these ("video-instance": post_process_video_instance_...)
        method = f"post_process_{task.replace('-', '_')}_segmentation"
        assert callable(getattr(family.processor_class, method, None)), task
    assert set(family.export_outputs) <= set(family.output_class.__dataclass_fields__)


def test_family_of_a_config_object_a_dict_and_a_folder():
    family = FAMILIES["mask2former"]
    config = family.config_class()
    assert family_of(config) is family
    assert family_of(config.to_dict()) is family
    assert family_of(REPO_ROOT / "hub_configs" / "tiny-swin-coco-panoptic") is family


def test_an_unknown_or_missing_model_type_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'detr' is not a model family of mask2former; known: .*mask2former"):
        family_for("detr")
    with pytest.raises(ValueError, match="no model_type"):
        family_of({"num_labels": 3})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        family_of(tmp_path)
