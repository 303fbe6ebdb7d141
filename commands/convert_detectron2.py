"""``mask2former convert-detectron2``: the original repository's checkpoints (detectron2 ``model_final.pkl``) to ours.

The original Mask2Former releases its weights as detectron2 pickles: ``{"model": {name: numpy array}, ...}`` with
detectron2 module names (``backbone.layers.0.blocks.0.attn.qkv.weight``, ``sem_seg_head.predictor.query_feat.weight``,
...). This command renames them to transformers' (= our) state-dict layout, splits the fused attention projections,
checks every name and shape against the model the chosen config builds, and writes ``model.safetensors``,
``config.json`` and ``preprocessor_config.json``: a folder ``from_pretrained`` loads (ours or transformers').

Safety: the pickle is read with a restricted unpickler that rebuilds only numpy arrays, numpy scalars/dtypes and plain
containers; any other global in the file (the way a pickle runs code) is refused with an error naming it.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HELP = "convert an original Mask2Former checkpoint (detectron2 model_final.pkl) to a from_pretrained folder"

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"

# ---- reading the pickle safely -------------------------------------------------------------------------------------

# (module, name) pairs a detectron2 checkpoint of numpy arrays needs; numpy 2 renamed numpy.core to numpy._core.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy arrays and plain containers need.

    ``find_class`` is the only way a pickle reaches code; refusing every other name makes loading a file unable to
    run anything but array reconstruction. A subclass widens ``allowed_globals`` for another checkpoint format
    (``convert_segmenter`` adds torch's tensor rebuilders).
    """

    allowed_globals: frozenset[tuple[str, str]] = frozenset(_ALLOWED_GLOBALS)
    refusal_hint = (
        "a detectron2 checkpoint holds only numpy arrays and plain containers. If this file is a torch checkpoint "
        "(.pth), convert it to numpy arrays first in a trusted environment."
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed_globals:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: {self.refusal_hint}")


def load_detectron2_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``model_final.pkl`` with :class:`RestrictedUnpickler`.

    Args:
        path: a detectron2 pickle: ``{"model": {name: array}, ...}`` or directly ``{name: array}``.

    Returns:
        `dict[str, np.ndarray]`: the weights by original name.
    """
    data = RestrictedUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()
    weights = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a detectron2 checkpoint dict ({{'model': ...}}).")
    arrays = {}
    for name, value in weights.items():
        array = np.asarray(value)
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{path}: entry {name!r} is not a numeric array ({array.dtype}).")
        arrays[str(name)] = array
    return arrays


# ---- the renaming rules --------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_INTEGER_FIELDS = {"i", "j", "b", "s", "c"}


@dataclass(frozen=True)
class Rule:
    """One renaming between an original name template and ours, usable both ways.

    ``{i}``-style fields are integers (``offsets`` says ours = original + offset), ``{p}`` is a parameter name,
    ``{qkv}`` in ours means the original tensor is a fused query/key/value projection split in three along dim 0.
    """

    original: str
    ours: str
    offsets: dict[str, int] = field(default_factory=dict)

    def _regex(self, template: str) -> re.Pattern:
        pattern = ""
        position = 0
        for match in _PLACEHOLDER.finditer(template):
            pattern += re.escape(template[position : match.start()])
            name = match.group(1)
            if name in _INTEGER_FIELDS:
                pattern += rf"(?P<{name}>\d+)"
            elif name == "qkv":
                pattern += r"(?P<qkv>[qkv])"
            else:
                pattern += rf"(?P<{name}>[A-Za-z_]+)"
            position = match.end()
        return re.compile(pattern + re.escape(template[position:]) + "$")

    def match_original(self, name: str) -> dict[str, str] | None:
        match = self._regex(self.original).match(name)
        return None if match is None else match.groupdict()

    def match_ours(self, name: str) -> dict[str, str] | None:
        match = self._regex(self.ours).match(name)
        return None if match is None else match.groupdict()

    def ours_name(self, fields: dict[str, str], **extra: str) -> str:
        values = {key: str(int(value) + self.offsets.get(key, 0)) if key in _INTEGER_FIELDS else value
                  for key, value in fields.items()}  # fmt: skip
        return self.ours.format(**values, **extra)

    def original_name(self, fields: dict[str, str]) -> str:
        values = {key: str(int(value) - self.offsets.get(key, 0)) if key in _INTEGER_FIELDS else value
                  for key, value in fields.items() if key != "qkv"}  # fmt: skip
        return self.original.format(**values)

    @property
    def splits_qkv(self) -> bool:
        return "{qkv}" in self.ours


_SWIN = "model.pixel_level_module.encoder.swin."
_RESNET = "model.pixel_level_module.encoder."
_PIXEL_DECODER = "model.pixel_level_module.decoder."
_TRANSFORMER = "model.transformer_module."

RULES: list[Rule] = [
    # Swin backbone (D2SwinTransformer)
    Rule("backbone.patch_embed.proj.{p}", _SWIN + "embeddings.patch_embeddings.projection.{p}"),
    Rule("backbone.patch_embed.norm.{p}", _SWIN + "embeddings.norm.{p}"),
    Rule("backbone.layers.{i}.blocks.{j}.norm1.{p}", _SWIN + "encoder.layers.{i}.blocks.{j}.layernorm_before.{p}"),
    Rule("backbone.layers.{i}.blocks.{j}.norm2.{p}", _SWIN + "encoder.layers.{i}.blocks.{j}.layernorm_after.{p}"),
    Rule(
        "backbone.layers.{i}.blocks.{j}.attn.qkv.{p}", _SWIN + "encoder.layers.{i}.blocks.{j}.attention.{qkv}_proj.{p}"
    ),
    Rule("backbone.layers.{i}.blocks.{j}.attn.proj.{p}", _SWIN + "encoder.layers.{i}.blocks.{j}.attention.o_proj.{p}"),
    Rule(
        "backbone.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
        _SWIN + "encoder.layers.{i}.blocks.{j}.attention.relative_position_bias.relative_position_bias_table",
    ),
    Rule("backbone.layers.{i}.blocks.{j}.mlp.fc1.{p}", _SWIN + "encoder.layers.{i}.blocks.{j}.mlp.fc1.{p}"),
    Rule("backbone.layers.{i}.blocks.{j}.mlp.fc2.{p}", _SWIN + "encoder.layers.{i}.blocks.{j}.mlp.fc2.{p}"),
    Rule("backbone.layers.{i}.downsample.reduction.{p}", _SWIN + "encoder.layers.{i}.downsample.reduction.{p}"),
    Rule("backbone.layers.{i}.downsample.norm.{p}", _SWIN + "encoder.layers.{i}.downsample.norm.{p}"),
    # the per-output norms norm0..norm3 of the detection Swin are transformers' hidden_states_norms stage1..stage4
    Rule("backbone.norm{i}.{p}", "model.pixel_level_module.encoder.hidden_states_norms.stage{i}.{p}", {"i": 1}),
    # ResNet backbone (detectron2 ResNet, torchvision layout: stride in the 3x3 conv)
    Rule("backbone.stem.conv1.weight", _RESNET + "embedder.embedder.convolution.weight"),
    Rule("backbone.stem.conv1.norm.{p}", _RESNET + "embedder.embedder.normalization.{p}"),
    Rule(
        "backbone.res{s}.{b}.conv{c}.weight",
        _RESNET + "encoder.stages.{s}.layers.{b}.layer.{c}.convolution.weight",
        {"s": -2, "c": -1},
    ),  # fmt: skip
    Rule(
        "backbone.res{s}.{b}.conv{c}.norm.{p}",
        _RESNET + "encoder.stages.{s}.layers.{b}.layer.{c}.normalization.{p}",
        {"s": -2, "c": -1},
    ),  # fmt: skip
    Rule(
        "backbone.res{s}.{b}.shortcut.weight",
        _RESNET + "encoder.stages.{s}.layers.{b}.shortcut.convolution.weight",
        {"s": -2},
    ),  # fmt: skip
    Rule(
        "backbone.res{s}.{b}.shortcut.norm.{p}",
        _RESNET + "encoder.stages.{s}.layers.{b}.shortcut.normalization.{p}",
        {"s": -2},
    ),  # fmt: skip
    # pixel decoder (MSDeformAttnPixelDecoder)
    Rule("sem_seg_head.pixel_decoder.input_proj.{i}.{j}.{p}", _PIXEL_DECODER + "input_projections.{i}.{j}.{p}"),
    Rule("sem_seg_head.pixel_decoder.transformer.level_embed", _PIXEL_DECODER + "level_embed"),
    *(
        Rule(
            f"sem_seg_head.pixel_decoder.transformer.encoder.layers.{{i}}.self_attn.{module}.{{p}}",
            _PIXEL_DECODER + f"encoder.layers.{{i}}.self_attn.{module}.{{p}}",
        )  # fmt: skip
        for module in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    ),
    *(
        Rule(
            f"sem_seg_head.pixel_decoder.transformer.encoder.layers.{{i}}.{original}.{{p}}",
            _PIXEL_DECODER + f"encoder.layers.{{i}}.{ours}.{{p}}",
        )  # fmt: skip
        for original, ours in (
            ("norm1", "self_attn_layer_norm"),
            ("linear1", "fc1"),
            ("linear2", "fc2"),
            ("norm2", "final_layer_norm"),
        )  # fmt: skip
    ),
    Rule("sem_seg_head.pixel_decoder.mask_features.{p}", _PIXEL_DECODER + "mask_projection.{p}"),
    Rule("sem_seg_head.pixel_decoder.adapter_{i}.weight", _PIXEL_DECODER + "adapter_{i}.0.weight"),
    Rule("sem_seg_head.pixel_decoder.adapter_{i}.norm.{p}", _PIXEL_DECODER + "adapter_{i}.1.{p}"),
    Rule("sem_seg_head.pixel_decoder.layer_{i}.weight", _PIXEL_DECODER + "layer_{i}.0.weight"),
    Rule("sem_seg_head.pixel_decoder.layer_{i}.norm.{p}", _PIXEL_DECODER + "layer_{i}.1.{p}"),
    # transformer decoder (MultiScaleMaskedTransformerDecoder)
    Rule(
        "sem_seg_head.predictor.transformer_self_attention_layers.{i}.self_attn.in_proj_{p}",
        _TRANSFORMER + "decoder.layers.{i}.self_attn.{qkv}_proj.{p}",
    ),  # fmt: skip
    Rule(
        "sem_seg_head.predictor.transformer_self_attention_layers.{i}.self_attn.out_proj.{p}",
        _TRANSFORMER + "decoder.layers.{i}.self_attn.out_proj.{p}",
    ),  # fmt: skip
    Rule(
        "sem_seg_head.predictor.transformer_self_attention_layers.{i}.norm.{p}",
        _TRANSFORMER + "decoder.layers.{i}.self_attn_layer_norm.{p}",
    ),  # fmt: skip
    Rule(
        "sem_seg_head.predictor.transformer_cross_attention_layers.{i}.multihead_attn.in_proj_{p}",
        _TRANSFORMER + "decoder.layers.{i}.cross_attn.in_proj_{p}",
    ),  # fmt: skip
    Rule(
        "sem_seg_head.predictor.transformer_cross_attention_layers.{i}.multihead_attn.out_proj.{p}",
        _TRANSFORMER + "decoder.layers.{i}.cross_attn.out_proj.{p}",
    ),  # fmt: skip
    Rule(
        "sem_seg_head.predictor.transformer_cross_attention_layers.{i}.norm.{p}",
        _TRANSFORMER + "decoder.layers.{i}.cross_attn_layer_norm.{p}",
    ),  # fmt: skip
    Rule("sem_seg_head.predictor.transformer_ffn_layers.{i}.linear1.{p}", _TRANSFORMER + "decoder.layers.{i}.fc1.{p}"),
    Rule("sem_seg_head.predictor.transformer_ffn_layers.{i}.linear2.{p}", _TRANSFORMER + "decoder.layers.{i}.fc2.{p}"),
    Rule(
        "sem_seg_head.predictor.transformer_ffn_layers.{i}.norm.{p}",
        _TRANSFORMER + "decoder.layers.{i}.final_layer_norm.{p}",
    ),  # fmt: skip
    Rule("sem_seg_head.predictor.decoder_norm.{p}", _TRANSFORMER + "decoder.layernorm.{p}"),
    Rule("sem_seg_head.predictor.query_feat.weight", _TRANSFORMER + "queries_features.weight"),
    Rule("sem_seg_head.predictor.query_embed.weight", _TRANSFORMER + "queries_embedder.weight"),
    Rule("sem_seg_head.predictor.level_embed.weight", _TRANSFORMER + "level_embed.weight"),
    Rule("sem_seg_head.predictor.input_proj.{i}.{p}", _TRANSFORMER + "input_projections.{i}.{p}"),
    Rule(
        "sem_seg_head.predictor.mask_embed.layers.{i}.{p}",
        _TRANSFORMER + "decoder.mask_predictor.mask_embedder.{i}.0.{p}",
    ),  # fmt: skip
    Rule("sem_seg_head.predictor.class_embed.{p}", "class_predictor.{p}"),
    Rule("criterion.empty_weight", "criterion.empty_weight"),
]

# Original entries with no counterpart: buffers transformers recomputes.
DROPPED_ORIGINAL = re.compile(r"(.*\.relative_position_index|pixel_mean|pixel_std)$")


def _fill_value(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Entries of ours with no original counterpart, and the value that keeps them neutral."""
    if name.endswith("num_batches_tracked"):  # FrozenBN has no counter; the statistics are final
        return np.zeros(shape, dtype=np.int64)
    if name.startswith(_SWIN + "layernorm."):  # Swin's final classification norm: unused by the backbone outputs
        return np.ones(shape, dtype=np.float32) if name.endswith("weight") else np.zeros(shape, dtype=np.float32)
    return None


def rename_to_ours(
    original: dict[str, np.ndarray], rules: list[Rule] | None = None, dropped: re.Pattern | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rename (and split) original weights by `rules` (default: Mask2Former's), skipping names `dropped` matches.

    Returns (ours by name, original names no rule knows).
    """
    rules = RULES if rules is None else rules
    dropped = DROPPED_ORIGINAL if dropped is None else dropped
    ours: dict[str, np.ndarray] = {}
    unknown = []
    for name, array in original.items():
        if dropped.match(name):
            continue
        for rule in rules:
            fields = rule.match_original(name)
            if fields is None:
                continue
            if rule.splits_qkv:
                # (3 * C, ...) fused query/key/value -> three (C, ...)
                for part, chunk in zip(("q", "k", "v"), np.split(array, 3, axis=0)):
                    ours[rule.ours_name(fields, qkv=part)] = chunk
            else:
                ours[rule.ours_name(fields)] = array
            break
        else:
            unknown.append(name)
    return ours, unknown


def rename_to_original(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`rename_to_ours` (fused projections re-concatenated; filled entries left out)."""
    original: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for name, array in ours.items():
        if _fill_value(name, tuple(np.shape(array))) is not None:
            continue  # ours only (BN counters, Swin's unused final norm)
        for rule in RULES:
            fields = rule.match_ours(name)
            if fields is None:
                continue
            if rule.splits_qkv:
                fused.setdefault(rule.original_name(fields), {})[fields["qkv"]] = array
            else:
                original[rule.original_name(fields)] = array
            break
        else:
            raise KeyError(f"no original name for {name}")
    for name, parts in fused.items():
        original[name] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return original


# ---- conversion ----------------------------------------------------------------------------------------------------


def resolve_variant(variant: str) -> Path:
    """A folder with config.json: a path, or a hub_configs name with or without the ``mask2former-`` prefix."""
    candidates = [Path(variant), HUB_CONFIGS / variant, HUB_CONFIGS / f"mask2former-{variant}"]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    known = sorted(path.name for path in HUB_CONFIGS.iterdir() if (path / "config.json").is_file())
    raise ValueError(f"unknown --variant {variant!r}: give a folder with config.json or one of {', '.join(known)}.")


def convert(checkpoint: str | Path, variant: str, output_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Convert ``checkpoint`` for the architecture of ``variant`` and write a ``from_pretrained`` folder.

    Args:
        checkpoint: detectron2 ``model_final.pkl``.
        variant: hub_configs name (``swin-tiny-coco-panoptic``) or a folder with ``config.json``.
        output_dir: where ``model.safetensors``, ``config.json`` and ``preprocessor_config.json`` go.

    Returns:
        `Path`: ``output_dir``.
    """
    import shutil

    import torch
    from safetensors.torch import save_file

    from mask2former.families import family_of

    config_dir = resolve_variant(variant)
    # the family of the variant's config: a video variant (video-mask2former-*) has the image model's names
    family = family_of(config_dir)
    config = family.config_class.from_pretrained(config_dir)
    with torch.device("meta"):  # names and shapes only
        expected = family.model_class(config).state_dict()

    original = load_detectron2_checkpoint(checkpoint)
    ours, unknown = rename_to_ours(original)
    for name, tensor in expected.items():
        if name not in ours:
            filled = _fill_value(name, tuple(tensor.shape))
            if filled is not None:
                ours[name] = filled
    misfits = fit_report(ours, expected, unknown)
    if misfits:
        raise ValueError(
            f"{checkpoint} does not fit --variant {variant}:"
            + misfits
            + "\nPick the variant matching the checkpoint's config (backbone, number of classes and queries)."
        )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # np.array(order="C") rather than ascontiguousarray, which would turn 0-d counters into shape (1,)
    tensors = {name: torch.from_numpy(np.array(array, order="C")).to(expected[name].dtype)
               for name, array in ours.items()}  # fmt: skip
    save_file(tensors, output_dir / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(output_dir)
    if (config_dir / "preprocessor_config.json").is_file():
        shutil.copyfile(config_dir / "preprocessor_config.json", output_dir / "preprocessor_config.json")
    log(f"converted {len(original)} original entries into {len(tensors)} tensors for {variant} -> {output_dir}")
    return output_dir


def fit_report(ours: dict[str, Any], expected: dict[str, Any], unknown: Iterable[str]) -> str:
    """What keeps renamed weights from loading strictly into a model: original names without a rule, names missing
    for the model or not in it, shape mismatches (arrays or tensors by name). Empty when everything fits."""
    mismatched = [
        f"{name}: checkpoint {tuple(ours[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(ours) & set(expected))
        if tuple(ours[name].shape) != tuple(expected[name].shape)
    ]
    return (
        _listing("original names without a rule", unknown)
        + _listing("missing for the model", sorted(set(expected) - set(ours)))
        + _listing("not in the model", sorted(set(ours) - set(expected)))
        + _listing("shape mismatches", mismatched)
    )


def _listing(title: str, items: Iterable[str], limit: int = 10) -> str:
    items = list(items)
    if not items:
        return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="the original model_final.pkl (detectron2 pickle of numpy arrays)"
    )
    parser.add_argument(
        "--variant",
        required=True,
        help="architecture and labels: a hub_configs name (e.g. swin-tiny-coco-panoptic) or a folder with config.json",
    )
    parser.add_argument("output_dir", type=Path, help="folder to write model.safetensors and the configs into")


def main(args: argparse.Namespace) -> int:
    try:
        convert(args.checkpoint, args.variant, args.output_dir)
    except (ValueError, pickle.UnpicklingError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    return 0
