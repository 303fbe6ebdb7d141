"""The model and image processor a run starts from: a checkpoint (fine-tune), a config folder, or a recipe's config.

The family (Mask2Former, ...) comes from ``model_type``: the ``config.json`` of ``--model``, or the recipe's
``model_config`` (Mask2Former when it names none), looked up in `mask2former.families`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..families import DEFAULT_MODEL_TYPE, ModelFamily, family_for, family_of
from .settings import TrainSettings

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def model_family(settings: TrainSettings) -> ModelFamily:
    """The family of the model the run trains."""
    if settings.model is not None:
        return family_of(settings.model)
    return family_for(settings.model_config.get("model_type", DEFAULT_MODEL_TYPE))


def build_processor(settings: TrainSettings) -> Any:
    """The processor saved with the model: the starting model's, or one from the recipe's ``processor_config``."""
    processor_class = model_family(settings).processor_class
    if settings.model is not None:
        model_path = Path(settings.model)
        if not model_path.is_dir() or (model_path / "preprocessor_config.json").is_file():
            processor = processor_class.from_pretrained(settings.model)
            for key, value in settings.processor_config.items():
                setattr(processor, key, value)
            return processor
    return processor_class(**settings.processor_config)


def build_model(settings: TrainSettings, label_info: Any) -> Any:
    """Fine-tune from weights, or build from a config (a hub_configs folder or the recipe's ``model_config``).

    The class head follows the dataset's labels: a checkpoint trained on other classes gets a new, randomly
    initialised class head (``ignore_mismatched_sizes``).
    """
    family = model_family(settings)
    id2label = {int(k): v for k, v in label_info.id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    if settings.model is None:
        model_config = {key: value for key, value in settings.model_config.items() if key != "model_type"}
        config = family.config_class(**model_config, id2label=id2label, label2id=label2id, num_labels=len(id2label))
        return family.model_class(config)
    model_path = Path(settings.model)
    has_weights = not model_path.is_dir() or any((model_path / name).is_file() for name in WEIGHT_FILES)
    config = family.config_class.from_pretrained(settings.model)
    for key, value in settings.model_config.items():
        setattr(config, key, value)
    same_labels = config.id2label == id2label
    config.id2label, config.label2id = id2label, label2id
    if has_weights:
        return family.model_class.from_pretrained(
            settings.model, config=config, ignore_mismatched_sizes=not same_labels
        )
    return family.model_class(config)
