"""convert-detectron2: a synthetic detectron2 pickle with the original names becomes a strict-loading checkpoint."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from mask2former.commands import main as cli_main
from mask2former.commands.convert_detectron2 import (
    RestrictedUnpickler,
    load_detectron2_checkpoint,
    rename_to_original,
    rename_to_ours,
)

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"

# Names as they appear in the original repository's checkpoints (detectron2 module paths of
# D2SwinTransformer / ResNet, MSDeformAttnPixelDecoder and MultiScaleMaskedTransformerDecoder),
# written out by hand, independently of the rules under test.
ORIGINAL_NAMES_SWIN = [
    "backbone.patch_embed.proj.weight",
    "backbone.layers.0.blocks.0.attn.qkv.weight",
    "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
    "backbone.layers.0.blocks.0.attn.relative_position_index",
    "backbone.layers.0.blocks.0.mlp.fc1.bias",
    "backbone.layers.2.downsample.reduction.weight",
    "backbone.norm3.weight",
    "sem_seg_head.pixel_decoder.input_proj.0.1.weight",
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.bias",
    "sem_seg_head.pixel_decoder.mask_features.weight",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.1.multihead_attn.out_proj.bias",
    "sem_seg_head.predictor.transformer_ffn_layers.1.linear2.weight",
    "sem_seg_head.predictor.decoder_norm.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.query_embed.weight",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.class_embed.weight",
    "sem_seg_head.predictor.mask_embed.layers.2.bias",
]
ORIGINAL_NAMES_RESNET = [
    "backbone.stem.conv1.weight",
    "backbone.stem.conv1.norm.running_var",
    "backbone.res2.0.shortcut.weight",
    "backbone.res2.0.conv1.weight",
    "backbone.res3.0.conv2.norm.bias",
    "backbone.res5.0.conv3.weight",
]


def _random_model(folder: str) -> Mask2FormerForUniversalSegmentation:
    config = Mask2FormerConfig.from_pretrained(HUB_CONFIGS / folder)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():  # distinct values everywhere, BN statistics included, so a swap cannot go unnoticed
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    return model


def _detectron2_pickle(model: torch.nn.Module, path: Path, relative_position_index: bool = True) -> dict:
    ours = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    original = rename_to_original(ours)
    if relative_position_index:  # the original Swin saves this buffer; the converter must drop it
        for name in [name for name in original if name.endswith("attn.relative_position_bias_table")]:
            original[name.replace("relative_position_bias_table", "relative_position_index")] = np.zeros(
                (4, 4), dtype=np.int64
            )
    with open(path, "wb") as file:
        pickle.dump({"model": OrderedDict(original), "__author__": "synthetic"}, file)
    return original


@pytest.mark.parametrize(
    ("folder", "original_names"),
    [("tiny-swin-coco-panoptic", ORIGINAL_NAMES_SWIN), ("tiny-resnet-coco-panoptic", ORIGINAL_NAMES_RESNET)],
)
def test_conversion_loads_strictly_and_reproduces_the_model(folder, original_names, tmp_path):
    model = _random_model(folder)
    original = _detectron2_pickle(model, tmp_path / "model_final.pkl")
    # the inverse mapping lays the pickle out with the original repository's names
    assert set(original_names) <= set(original), sorted(set(original_names) - set(original))
    assert not any(name.startswith("model.") for name in original)

    assert cli_main(["convert-detectron2", str(tmp_path / "model_final.pkl"), "--variant", folder,
                     str(tmp_path / "out")]) == 0  # fmt: skip
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list((tmp_path / "out").glob("*.bin"))
    converted, info = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reference = model.state_dict()
    for name, tensor in converted.state_dict().items():
        if name.endswith("num_batches_tracked") or ".swin.layernorm." in name:
            continue  # no original counterpart: filled with neutral values
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model(pixel_values=pixel_values), converted.eval()(pixel_values=pixel_values)
    torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits)
    torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits)


def test_fused_projections_are_split_in_query_key_value_order():
    fused = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    name = "sem_seg_head.predictor.transformer_self_attention_layers.3.self_attn.in_proj_weight"
    ours, unknown = rename_to_ours({name: fused})
    prefix = "model.transformer_module.decoder.layers.3.self_attn."
    assert not unknown
    np.testing.assert_array_equal(ours[prefix + "q_proj.weight"], fused[:4])
    np.testing.assert_array_equal(ours[prefix + "k_proj.weight"], fused[4:8])
    np.testing.assert_array_equal(ours[prefix + "v_proj.weight"], fused[8:])
    assert set(rename_to_original(ours)) == {name}


def test_stage_and_layer_numbers_are_shifted():
    ours, _ = rename_to_ours({"backbone.res4.5.conv3.weight": np.zeros(1), "backbone.norm0.bias": np.zeros(1)})
    assert set(ours) == {
        "model.pixel_level_module.encoder.encoder.stages.2.layers.5.layer.2.convolution.weight",
        "model.pixel_level_module.encoder.hidden_states_norms.stage1.bias",
    }


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.x": _Payload()}}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_detectron2_checkpoint(path)
    # torch tensors are globals too: a .pth file is refused, never executed
    buffer = io.BytesIO()
    pickle.dump({"model": {"w": torch.zeros(2)}}, buffer)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(buffer.getvalue())).load()


def test_wrong_variant_is_reported_not_crashed(tmp_path, capsys):
    _detectron2_pickle(_random_model("tiny-swin-coco-panoptic"), tmp_path / "model_final.pkl")
    checkpoint = str(tmp_path / "model_final.pkl")
    status = cli_main(
        ["convert-detectron2", checkpoint, "--variant", "tiny-resnet-coco-panoptic", str(tmp_path / "out")]
    )
    assert status == 1
    assert "does not fit --variant tiny-resnet-coco-panoptic" in capsys.readouterr().out
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert cli_main(["convert-detectron2", str(tmp_path / "model_final.pkl"), "--variant", "nope", str(tmp_path)]) == 1
