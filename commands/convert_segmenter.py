"""``mask2former convert-segmenter``: Segmenter checkpoints (the original's, mmsegmentation's) to ours.

Two layouts are read:

- **the original** (rstrudel/segmenter): ``checkpoint.pth`` = ``torch.save({"model": state_dict, "optimizer", ...})``
  with ``encoder.*`` (timm-layout ViT: ``blocks.N.attn.qkv``, ``norm1``, ...; an unused 1000-class ImageNet
  ``encoder.head``) and ``decoder.*`` (the mask transformer's or linear decoder's own names), plus ``variant.yml``
  beside it, which ``segm/train.py`` writes with ``yaml.dump`` and which holds the architecture (``net_kwargs``) and
  the evaluation's sliding window (``inference_kwargs``).
- **mmsegmentation**: ``{"meta", "state_dict"}`` with ``backbone.*`` (mmseg ViT: ``layers.N.ln1``,
  ``attn.attn.in_proj_weight``, ``ffn.layers.0.0``, ``ln1`` as the final norm) and ``decode_head.*``
  (``SegmenterMaskTransformerHead``, whose ``patch_proj``/``classes_proj`` are ``nn.Linear`` — the transpose of the
  original's right-multiplied parameters — or ``FCNHead`` with ``num_convs=0``, the linear decoder, as
  ``conv_seg``). There is no architecture file: it is read off the tensor shapes (heads = width / 64 as in every
  published Segmenter) with mmsegmentation's LayerNorm eps 1e-6, bicubic position resizing and slide 512 / 480, or
  taken from ``--config``.

Every name is renamed (fused q/k/v split for the ViT), checked against the model the config builds (no missing,
unexpected or mis-shaped entry), and written with ``save_pretrained`` plus a ``preprocessor_config.json``. Dropped by
name only: the original's ImageNet head ``encoder.head.*`` and, in mmseg mask heads, the unused ``conv_seg`` classifier
of ``BaseDecodeHead``.

Safety: the ``.pth`` is read with the detectron2 converter's restricted unpickler, widened to torch's tensor
rebuilders (tensors, numpy arrays and plain containers only); ``variant.yml`` with a safe YAML loader that also builds
the ``!!python/tuple`` the original writes for ``image_size`` (PyYAML's ``safe_load`` rejects the file).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .convert_detectron2 import HUB_CONFIGS, RestrictedUnpickler, Rule, fit_report, rename_to_ours

HELP = "convert a Segmenter checkpoint (the original's checkpoint.pth + variant.yml, or mmsegmentation's .pth)"

# ---- reading the files safely --------------------------------------------------------------------------------------


class TorchCheckpointUnpickler(RestrictedUnpickler):
    """:class:`RestrictedUnpickler` plus the functions ``torch.save`` uses to rebuild tensors and parameters."""

    allowed_globals = RestrictedUnpickler.allowed_globals | {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
    }
    refusal_hint = "a checkpoint to convert holds only tensors, numpy arrays and plain containers."


# torch.load's interface to a pickle module: its Unpickler subclass resolves torch's storage names itself and defers
# every other global to ours.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="mask2former_restricted_pickle",
    Unpickler=TorchCheckpointUnpickler,
    load=lambda file, **kwargs: TorchCheckpointUnpickler(file, **kwargs).load(),
)


def load_torch_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a ``torch.save`` file on the CPU with :class:`TorchCheckpointUnpickler`.

    Raises:
        `pickle.UnpicklingError`: naming the first global outside tensors and plain containers.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False only because a pickle_module is given: ours is the restriction.
    data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict.")
    return data


def _variant_loader() -> type:
    """A PyYAML ``SafeLoader`` that also builds ``!!python/tuple`` (as a tuple), and nothing else beyond safe YAML."""
    import yaml

    class VariantLoader(yaml.SafeLoader):
        pass

    def construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
        return tuple(loader.construct_sequence(node))

    VariantLoader.add_constructor("tag:yaml.org,2002:python/tuple", construct_tuple)
    return VariantLoader


def read_variant(path: str | Path) -> dict[str, Any]:
    """Reads the original's ``variant.yml`` safely (the ``!!python/tuple`` it writes becomes a tuple)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no variant.yml at {path}: the original writes it beside checkpoint.pth; pass --variant PATH."
        )
    try:
        with path.open() as file:
            variant = yaml.load(file, Loader=_variant_loader())  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not a safe variant.yml (plain YAML plus !!python/tuple): {error}") from error
    if not isinstance(variant, dict) or "net_kwargs" not in variant:
        raise ValueError(f"{path} has no 'net_kwargs': not a Segmenter variant.yml.")
    return variant


# ---- the renaming rules --------------------------------------------------------------------------------------------

_VIT = "segmenter.encoder."

# One transformer block's parameters: (ours in transformers' ViT, the original's timm names, mmcv's names). The
# original's decoder blocks use its own (timm) names, so mmseg's decoder blocks map onto those.
_BLOCK = [
    ("layernorm_before.{p}", "norm1.{p}", "ln1.{p}"),
    ("layernorm_after.{p}", "norm2.{p}", "ln2.{p}"),
    ("attention.{qkv}_proj.{p}", "attn.qkv.{p}", "attn.attn.in_proj_{p}"),
    ("attention.o_proj.{p}", "attn.proj.{p}", "attn.attn.out_proj.{p}"),
    ("mlp.fc1.{p}", "mlp.fc1.{p}", "ffn.layers.0.0.{p}"),
    ("mlp.fc2.{p}", "mlp.fc2.{p}", "ffn.layers.1.{p}"),
]
# The rest of the ViT: (ours, the original's, mmseg's); mmseg's final norm is `ln1` of the backbone.
_VIT_REST = [
    ("embeddings.cls_token", "cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed", "pos_embed"),
    ("embeddings.patch_embeddings.projection.{p}", "patch_embed.proj.{p}", "patch_embed.projection.{p}"),
    ("layernorm.{p}", "norm.{p}", "ln1.{p}"),
]

ORIGINAL_RULES: list[Rule] = [
    *(Rule(f"encoder.{original}", _VIT + ours) for ours, original, _ in _VIT_REST),
    *(Rule(f"encoder.blocks.{{i}}.{original}", _VIT + f"layers.{{i}}.{ours}") for ours, original, _ in _BLOCK),
    # the decoders keep the original's names
    *(Rule(f"decoder.blocks.{{i}}.{original}", f"decoder.blocks.{{i}}.{original}") for _, original, _ in _BLOCK),
    *(Rule(f"decoder.{name}", f"decoder.{name}") for name in ("cls_emb", "proj_patch", "proj_classes")),
    *(Rule(f"decoder.{name}.{{p}}", f"decoder.{name}.{{p}}") for name in ("proj_dec", "decoder_norm", "mask_norm")),
    Rule("decoder.head.{p}", "decoder.head.{p}"),  # the linear decoder
]
# The original's ViT keeps timm's 1000-class ImageNet classifier; Segmenter never calls it.
ORIGINAL_DROPPED = re.compile(r"encoder\.head\.(weight|bias)$")

MMSEG_RULES: list[Rule] = [
    *(Rule(f"backbone.{mmseg}", _VIT + ours) for ours, _, mmseg in _VIT_REST),
    *(Rule(f"backbone.layers.{{i}}.{mmseg}", _VIT + f"layers.{{i}}.{ours}") for ours, _, mmseg in _BLOCK),
    *(Rule(f"decode_head.layers.{{i}}.{mmseg}", f"decoder.blocks.{{i}}.{original}") for _, original, mmseg in _BLOCK),
    Rule("decode_head.cls_emb", "decoder.cls_emb"),
    Rule("decode_head.dec_proj.{p}", "decoder.proj_dec.{p}"),
    Rule("decode_head.patch_proj.weight", "decoder.proj_patch"),
    Rule("decode_head.classes_proj.weight", "decoder.proj_classes"),
    Rule("decode_head.decoder_norm.{p}", "decoder.decoder_norm.{p}"),
    Rule("decode_head.mask_norm.{p}", "decoder.mask_norm.{p}"),
    Rule("decode_head.conv_seg.{p}", "decoder.head.{p}"),  # FCNHead, num_convs=0: the linear decoder
]
# nn.Linear(bias=False) weights are (out, in): the original right-multiplies x @ P, i.e. P = weight^T. The linear
# decoder's 1x1 convolution (K, D, 1, 1) is a (K, D) Linear.
MMSEG_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "decoder.proj_patch": lambda array: array.T,
    "decoder.proj_classes": lambda array: array.T,
    "decoder.head.weight": lambda array: array.reshape(array.shape[0], array.shape[1]),
}


def _mmseg_dropped(state_dict: dict[str, Any]) -> re.Pattern:
    # A mask head inherits BaseDecodeHead's conv_seg classifier (older mmseg versions keep it) and never calls it.
    if "decode_head.cls_emb" in state_dict:
        return re.compile(r"decode_head\.conv_seg\.(weight|bias)$")
    return re.compile(r"$^")


def detect_layout(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``("original" | "mmseg", state_dict)`` of a loaded checkpoint."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state_dict = checkpoint[key]
            break
    else:
        state_dict = checkpoint
    if "encoder.pos_embed" in state_dict:
        return "original", state_dict
    if "backbone.pos_embed" in state_dict:
        return "mmseg", state_dict
    sample = ", ".join(list(state_dict)[:5])
    raise ValueError(
        "neither the original Segmenter layout (encoder.pos_embed) nor mmsegmentation's (backbone.pos_embed) was "
        f"found; the checkpoint's first names are: {sample}."
    )


# ---- configs -----------------------------------------------------------------------------------------------------


def _count(state_dict: dict[str, Any], pattern: str) -> int:
    indices = {int(match.group(1)) for name in state_dict if (match := re.match(pattern, name))}
    return max(indices) + 1 if indices else 0


def config_from_variant(variant: dict[str, Any]) -> dict[str, Any]:
    """`SegmenterConfig` kwargs from the original's ``variant.yml`` (its factory's rules resolved)."""
    net = variant["net_kwargs"]
    if net.get("distilled"):
        raise ValueError(
            "this checkpoint has a DeiT distillation token (net_kwargs.distilled: true); transformers' ViTModel has "
            "none, so distilled Segmenter variants (Seg-B-dagger) cannot be converted."
        )
    decoder = dict(net.get("decoder") or {})
    name = decoder.get("name", "mask_transformer")
    if name not in ("mask_transformer", "linear"):
        raise ValueError(f"decoder {name!r} in variant.yml is not supported; convert mask_transformer or linear.")
    width = int(net["d_model"])
    image_size = [int(side) for side in net["image_size"]]
    inference = variant.get("inference_kwargs") or {}
    return {
        "encoder_config": {
            "hidden_size": width,
            "num_hidden_layers": int(net["n_layers"]),
            "num_attention_heads": int(net["n_heads"]),
            "intermediate_size": 4 * width,  # create_vit: d_ff = 4 * d_model
            "image_size": image_size,
            "patch_size": int(net["patch_size"]),
            "layer_norm_eps": 1e-5,
            "hidden_dropout_prob": float(net.get("dropout", 0.0)),
        },
        "decoder_type": "linear" if "linear" in name else "mask_transformer",
        "decoder_layers": int(decoder.get("n_layers", 0 if "linear" in name else 2)),
        "decoder_dropout": float(decoder.get("dropout", 0.0)),
        "decoder_drop_path_rate": float(decoder.get("drop_path_rate", 0.0)),
        "encoder_drop_path_rate": float(net.get("drop_path_rate", 0.0)),
        "position_embedding_interpolation": "bilinear",
        "window_size": inference.get("window_size"),
        "window_stride": inference.get("window_stride"),
        "num_labels": int(net["n_cls"]),
    }


def config_from_mmseg(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`SegmenterConfig` kwargs read off an mmsegmentation state dict's shapes, with mmseg's Segmenter settings."""
    width = int(state_dict["backbone.cls_token"].shape[-1])
    patch_size = int(state_dict["backbone.patch_embed.projection.weight"].shape[-1])
    grid = int(round((state_dict["backbone.pos_embed"].shape[1] - 1) ** 0.5))
    mask_head = "decode_head.cls_emb" in state_dict
    if mask_head:
        num_labels = int(state_dict["decode_head.cls_emb"].shape[1])
        decoder_width = int(state_dict["decode_head.dec_proj.weight"].shape[0])
    else:
        num_labels = int(state_dict["decode_head.conv_seg.weight"].shape[0])
        decoder_width = width
    return {
        "encoder_config": {
            "hidden_size": width,
            "num_hidden_layers": _count(state_dict, r"backbone\.layers\.(\d+)\."),
            "num_attention_heads": width // 64,
            "intermediate_size": int(state_dict["backbone.layers.0.ffn.layers.0.0.weight"].shape[0]),
            "image_size": grid * patch_size,
            "patch_size": patch_size,
            "layer_norm_eps": 1e-6,  # configs/_base_/models/segmenter_vit-b16_mask.py: LN eps 1e-6
        },
        "decoder_type": "mask_transformer" if mask_head else "linear",
        "decoder_layers": _count(state_dict, r"decode_head\.layers\.(\d+)\.") if mask_head else 0,
        "decoder_hidden_size": decoder_width,
        "decoder_num_attention_heads": max(1, decoder_width // 64),
        "decoder_intermediate_size": (
            int(state_dict["decode_head.layers.0.ffn.layers.0.0.weight"].shape[0]) if mask_head else None
        ),
        "decoder_dropout": 0.0,
        "encoder_drop_path_rate": 0.1,
        "position_embedding_interpolation": "bicubic",
        "window_size": 512,  # test_cfg: mode slide, crop 512, stride 480
        "window_stride": 480,
        "num_labels": num_labels,
    }


def _dataset_labels(dataset: str | None, num_labels: int) -> dict[int, str] | None:
    # The class names of a dataset the original trains on, from one of our hub configs with that many classes.
    folder = {"ade20k": "segmenter-vit-tiny-ade"}.get(str(dataset))
    config_file = HUB_CONFIGS / folder / "config.json" if folder else None
    if config_file is None or not config_file.is_file():
        return None
    id2label = {int(key): value for key, value in json.loads(config_file.read_text())["id2label"].items()}
    return id2label if len(id2label) == num_labels else None


def resolve_config(config: str) -> Path:
    """A folder with config.json: a path, or a hub_configs name with or without the ``segmenter-`` prefix."""
    for candidate in (Path(config), HUB_CONFIGS / config, HUB_CONFIGS / f"segmenter-{config}"):
        if (candidate / "config.json").is_file():
            return candidate
    known = sorted(path.name for path in HUB_CONFIGS.glob("segmenter-*") if (path / "config.json").is_file())
    raise ValueError(f"unknown --config {config!r}: give a folder with config.json or one of {', '.join(known)}.")


def processor_kwargs(variant: dict[str, Any] | None, patch_size: int, num_labels: int) -> dict[str, Any]:
    """`Mask2FormerImageProcessor` settings of the original's evaluation: shortest side `im_size` (longest at most
    4x, mmseg's ``img_scale``), its normalisation ("vit": mean = std = 0.5; "deit": ImageNet's), ADE20K's label
    reduction. Without a variant (mmseg checkpoints): 512, mean = std = 127.5 / 255, reduction for 150 classes."""
    variant = variant or {}
    dataset = variant.get("dataset_kwargs") or {}
    normalization = (variant.get("net_kwargs") or {}).get("normalization", dataset.get("normalization", "vit"))
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if normalization == "deit" else ((0.5,) * 3, (0.5,) * 3)
    shortest_edge = int((variant.get("inference_kwargs") or {}).get("im_size", 512))
    ade20k = dataset.get("dataset") == "ade20k" if dataset else num_labels == 150
    return {
        "size": {"shortest_edge": shortest_edge, "longest_edge": 4 * shortest_edge},
        "size_divisor": patch_size,
        "image_mean": list(mean),
        "image_std": list(std),
        "ignore_index": 255,
        "do_reduce_labels": ade20k,
        "num_labels": num_labels,
    }


# ---- conversion ----------------------------------------------------------------------------------------------------


def _to_numpy(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    import torch

    arrays = {}
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            arrays[name] = value.detach().float().numpy() if value.is_floating_point() else value.numpy()
        elif isinstance(value, np.ndarray):
            arrays[name] = value
        else:
            raise ValueError(f"checkpoint entry {name!r} is a {type(value).__name__}, not a tensor.")
    return arrays


def convert_segmenter(
    checkpoint: str | Path,
    output_dir: str | Path,
    variant: str | Path | None = None,
    config: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert a Segmenter checkpoint and write a ``from_pretrained`` folder.

    Args:
        checkpoint: the original's ``checkpoint.pth`` or mmsegmentation's ``.pth``.
        output_dir: where ``model.safetensors``, ``config.json`` and ``preprocessor_config.json`` go.
        variant: the original's ``variant.yml``; default: beside the checkpoint (as the original's ``load_model``).
        config: a hub_configs name (``segmenter-vit-small-ade``) or folder with ``config.json`` to convert into
            (architecture and labels); default: from ``variant.yml``, or read off an mmseg checkpoint's shapes.

    Returns:
        `Path`: ``output_dir``.
    """
    import torch

    from mask2former.modeling.configuration_segmenter import SegmenterConfig
    from mask2former.modeling.modeling_segmenter import SegmenterForSemanticSegmentation
    from mask2former.processing.image_processing_mask2former import Mask2FormerImageProcessor

    checkpoint = Path(checkpoint)
    layout, state_dict = detect_layout(load_torch_checkpoint(checkpoint))
    original = _to_numpy(state_dict)
    variant_data = None
    if layout == "original":
        variant_data = read_variant(variant or checkpoint.parent / "variant.yml")
        config_kwargs = config_from_variant(variant_data)
        rules, dropped = ORIGINAL_RULES, ORIGINAL_DROPPED
    else:
        config_kwargs = config_from_mmseg(state_dict)
        rules, dropped = MMSEG_RULES, _mmseg_dropped(state_dict)
    ours, unknown = rename_to_ours(original, rules, dropped)
    if layout == "mmseg":
        ours = {name: MMSEG_TRANSFORMS.get(name, lambda array: array)(array) for name, array in ours.items()}
    dropped_names = [name for name in original if dropped.match(name)]

    if config is not None:
        model_config = SegmenterConfig.from_pretrained(resolve_config(str(config)))
    else:
        dataset = ((variant_data or {}).get("dataset_kwargs") or {}).get("dataset")
        id2label = _dataset_labels(dataset, config_kwargs["num_labels"])
        if id2label is not None:
            config_kwargs.pop("num_labels")
            config_kwargs.update(id2label=id2label, label2id={label: index for index, label in id2label.items()})
        model_config = SegmenterConfig(**config_kwargs)

    with torch.device("meta"):  # names and shapes only; the converted tensors are assigned below
        model = SegmenterForSemanticSegmentation(model_config)
    expected = model.state_dict()
    misfits = fit_report(ours, expected, unknown)
    if misfits:
        raise ValueError(
            f"{checkpoint} ({layout} layout) does not fit the Segmenter config:"
            + misfits
            + "\nPass --config with the checkpoint's architecture (width, layers, patch size, classes, decoder)."
        )
    tensors = {
        name: torch.from_numpy(np.array(array, order="C")).to(expected[name].dtype) for name, array in ours.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor = Mask2FormerImageProcessor(
        **processor_kwargs(variant_data, model_config.patch_size, model_config.num_labels)
    )
    processor.save_pretrained(output_dir)
    log(
        f"converted {len(original)} {layout}-layout entries into {len(tensors)} tensors -> {output_dir}"
        + (f" (dropped by name: {', '.join(dropped_names)})" if dropped_names else "")
    )
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pth of the original, or an mmsegmentation .pth")
    parser.add_argument("output_dir", type=Path, help="folder to write model.safetensors and the configs into")
    parser.add_argument(
        "--variant", type=Path, default=None, help="the original's variant.yml (default: beside the checkpoint)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="architecture and labels to convert into: a hub_configs name (e.g. segmenter-vit-small-ade) or a folder "
        "with config.json (default: from variant.yml, or read off an mmsegmentation checkpoint)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        convert_segmenter(args.checkpoint, args.output_dir, variant=args.variant, config=args.config)
    except (ValueError, pickle.UnpicklingError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    return 0
