"""convert-segmenter: the golden fixture made with the original rstrudel/segmenter code (its checkpoint.pth +
variant.yml) converts with no missing or unexpected keys and reproduces the original's outputs; mmsegmentation's
layout, built here from its key names, converts to the same weights; unsafe files are refused."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mask2former import SegmenterForSemanticSegmentation
from mask2former.commands import main as cli_main
from mask2former.commands.convert_segmenter import convert_segmenter, load_torch_checkpoint, read_variant
from mask2former.processing.image_processing_mask2former import Mask2FormerImageProcessor

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "oracles" / "segmenter"


@pytest.fixture(scope="module")
def fixture() -> dict[str, dict[str, torch.Tensor]]:
    if not (FIXTURE / "checkpoint.pth").is_file():
        pytest.fail(f"the Segmenter golden fixture is missing at {FIXTURE}; it ships in shared/data/oracles")
    return {
        "state_dict": load_file(FIXTURE / "state_dict.safetensors"),
        "inputs": load_file(FIXTURE / "inputs.safetensors"),
        "outputs": load_file(FIXTURE / "outputs.safetensors"),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("segmenter")
    messages = []
    convert_segmenter(FIXTURE / "checkpoint.pth", output_dir, log=messages.append)
    (output_dir / "log.txt").write_text("\n".join(messages))
    return output_dir


def _assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    # the fixture README's tolerance for an independent float32 implementation: atol = rtol = 1e-5
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
    assert (actual - expected).abs().max() / expected.abs().max() <= tolerance


def test_converted_fixture_reproduces_the_original(converted, fixture):
    model, info = SegmenterForSemanticSegmentation.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    pixel_values = fixture["inputs"]["pixel_values"]  # (2, 3, 64, 96): an 8 x 12 grid, pretrained on 8 x 8
    outputs = fixture["outputs"]
    with torch.no_grad():
        logits = model(pixel_values).logits
        tokens = model.segmenter(pixel_values).last_hidden_state
        position_embeddings = model.segmenter.encoder.embeddings.interpolate_pos_encoding(tokens, 64, 96)
        covering = model.sliding_window_inference(pixel_values, window_size=96).logits
    _assert_relative(logits, outputs["decoder_masks"])
    _assert_relative(tokens, outputs["encoder_features"])
    torch.testing.assert_close(position_embeddings, outputs["pos_embed_resized"], rtol=1e-6, atol=1e-7)
    # Segmenter.forward's masks: the logits upsampled bilinearly to the input
    masks = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
    _assert_relative(masks, outputs["masks"])
    _assert_relative(covering, outputs["masks"])


def test_config_and_processor_come_from_variant_yml(converted):
    model = SegmenterForSemanticSegmentation.from_pretrained(converted)
    config = model.config
    encoder = config.encoder_config
    # variant.yml net_kwargs: d_model 128, n_heads 2, n_layers 2, patch 8, image_size (64, 64), n_cls 5
    assert (encoder.hidden_size, encoder.num_attention_heads, encoder.num_hidden_layers) == (128, 2, 2)
    assert (encoder.patch_size, list(encoder.image_size), encoder.intermediate_size) == (8, [64, 64], 512)
    assert encoder.layer_norm_eps == 1e-5 and config.position_embedding_interpolation == "bilinear"
    assert (config.num_labels, config.decoder_layers, config.decoder_num_attention_heads) == (5, 2, 2)
    assert (config.window_size, config.window_stride) == (64, 64)  # inference_kwargs
    processor = Mask2FormerImageProcessor.from_pretrained(converted)
    assert processor.size["shortest_edge"] == 64 and processor.size_divisor == 8
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    assert processor.do_reduce_labels and processor.ignore_index == 255  # dataset ade20k


def test_only_the_imagenet_head_is_dropped(converted, fixture):
    log = (converted / "log.txt").read_text()
    assert "dropped by name: encoder.head.weight, encoder.head.bias" in log
    saved = load_file(converted / "model.safetensors")
    original_values = sum(tensor.numel() for tensor in fixture["state_dict"].values())
    head_values = sum(
        tensor.numel() for name, tensor in fixture["state_dict"].items() if name.startswith("encoder.head")
    )
    assert sum(tensor.numel() for tensor in saved.values()) == original_values - head_values


def _copy_fixture(tmp_path: Path, state_dict: dict | None = None, variant_text: str | None = None) -> Path:
    checkpoint = tmp_path / "checkpoint.pth"
    if state_dict is None:
        shutil.copyfile(FIXTURE / "checkpoint.pth", checkpoint)
    else:
        torch.save({"model": state_dict, "n_cls": 5, "epoch": 0}, checkpoint)
    (tmp_path / "variant.yml").write_text(variant_text or (FIXTURE / "variant.yml").read_text())
    return checkpoint


def test_unknown_and_missing_entries_are_named(tmp_path, fixture):
    state_dict = dict(fixture["state_dict"])
    state_dict["encoder.blocks.0.attn.extra_scale"] = torch.ones(1)
    del state_dict["decoder.mask_norm.bias"]
    checkpoint = _copy_fixture(tmp_path, state_dict)
    with pytest.raises(ValueError) as error:
        convert_segmenter(checkpoint, tmp_path / "out")
    message = str(error.value)
    assert "encoder.blocks.0.attn.extra_scale" in message and "decoder.mask_norm.bias" in message
    assert not (tmp_path / "out").exists()


def test_linear_decoder_of_the_original(tmp_path, fixture):
    state_dict = {name: tensor for name, tensor in fixture["state_dict"].items() if name.startswith("encoder.")}
    head_weight, head_bias = torch.randn(5, 128), torch.randn(5)
    state_dict.update({"decoder.head.weight": head_weight, "decoder.head.bias": head_bias})
    variant = (FIXTURE / "variant.yml").read_text()
    variant = re.sub(r"    name: mask_transformer", "    name: linear", variant)
    checkpoint = _copy_fixture(tmp_path, state_dict, variant)
    convert_segmenter(checkpoint, tmp_path / "out", log=lambda message: None)
    model = SegmenterForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    assert model.config.decoder_type == "linear"
    with torch.no_grad():
        logits = model(fixture["inputs"]["pixel_values"]).logits
    # DecoderLinear on the original's encoder features: a Linear per patch token, rearranged to (B, K, h, w)
    patches = fixture["outputs"]["encoder_features"][:, 1:]
    expected = (patches @ head_weight.T + head_bias).transpose(1, 2).reshape(2, 5, 8, 12)
    _assert_relative(logits, expected)


# mmsegmentation's names for the same modules (mmseg/models/backbones/vit.py, decode_heads/segmenter_mask_head.py),
# written out by hand, independently of the converter's rules.
_TO_MMSEG = [
    (r"^encoder\.cls_token$", "backbone.cls_token"),
    (r"^encoder\.pos_embed$", "backbone.pos_embed"),
    (r"^encoder\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^encoder\.norm\.", "backbone.ln1."),
    (r"^encoder\.blocks\.", "backbone.layers."),
    (r"^decoder\.blocks\.", "decode_head.layers."),
    (r"\.norm1\.", ".ln1."),
    (r"\.norm2\.", ".ln2."),
    (r"\.attn\.qkv\.(weight|bias)$", r".attn.attn.in_proj_\1"),
    (r"\.attn\.proj\.", ".attn.attn.out_proj."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
    (r"^decoder\.proj_dec\.", "decode_head.dec_proj."),
    (r"^decoder\.cls_emb$", "decode_head.cls_emb"),
    (r"^decoder\.decoder_norm\.", "decode_head.decoder_norm."),
    (r"^decoder\.mask_norm\.", "decode_head.mask_norm."),
]


def _mmseg_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for name, tensor in original.items():
        if name.startswith("encoder.head."):
            continue  # mmseg's backbone has no classifier
        if name in ("decoder.proj_patch", "decoder.proj_classes"):
            # nn.Linear(bias=False): weight (out, in), x @ weight^T == x @ proj
            state_dict[f"decode_head.{name.split('_')[1]}_proj.weight"] = tensor.T.contiguous()
            continue
        for pattern, replacement in _TO_MMSEG:
            name = re.sub(pattern, replacement, name)
        state_dict[name] = tensor
    return state_dict


def test_mmseg_layout_converts_to_the_same_weights(tmp_path, converted, fixture):
    state_dict = _mmseg_state_dict(fixture["state_dict"])
    assert "decode_head.patch_proj.weight" in state_dict and "backbone.layers.1.attn.attn.in_proj_weight" in state_dict
    # older mmseg versions keep BaseDecodeHead's classifier beside the mask head, unused
    state_dict["decode_head.conv_seg.weight"], state_dict["decode_head.conv_seg.bias"] = (
        torch.randn(5, 128, 1, 1),
        torch.randn(5),
    )
    torch.save({"meta": {"CLASSES": ("a", "b", "c", "d", "e")}, "state_dict": state_dict}, tmp_path / "mmseg.pth")

    # into the fixture's architecture (--config): the original's outputs
    convert_segmenter(tmp_path / "mmseg.pth", tmp_path / "as-original", config=converted, log=lambda message: None)
    model = SegmenterForSemanticSegmentation.from_pretrained(tmp_path / "as-original").eval()
    with torch.no_grad():
        _assert_relative(model(fixture["inputs"]["pixel_values"]).logits, fixture["outputs"]["decoder_masks"])

    # read off the shapes: mmseg's settings, the same tensors as the original's conversion
    messages = []
    convert_segmenter(tmp_path / "mmseg.pth", tmp_path / "inferred", log=messages.append)
    assert "dropped by name: decode_head.conv_seg.weight, decode_head.conv_seg.bias" in messages[0]
    inferred = SegmenterForSemanticSegmentation.from_pretrained(tmp_path / "inferred")
    config = inferred.config
    assert config.encoder_config.layer_norm_eps == 1e-6 and config.position_embedding_interpolation == "bicubic"
    assert (config.window_size, config.window_stride, config.num_labels) == (512, 480, 5)
    reference = SegmenterForSemanticSegmentation.from_pretrained(converted).state_dict()
    ours = inferred.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_mmseg_linear_head(tmp_path, fixture):
    state_dict = _mmseg_state_dict({k: v for k, v in fixture["state_dict"].items() if k.startswith("encoder.")})
    weight, bias = torch.randn(5, 128, 1, 1), torch.randn(5)
    state_dict.update({"decode_head.conv_seg.weight": weight, "decode_head.conv_seg.bias": bias})
    torch.save({"state_dict": state_dict}, tmp_path / "linear.pth")
    convert_segmenter(tmp_path / "linear.pth", tmp_path / "out", log=lambda message: None)
    model = SegmenterForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert model.config.decoder_type == "linear"
    torch.testing.assert_close(model.decoder.head.weight, weight[:, :, 0, 0], rtol=0, atol=0)


class _MakesADirectory:
    """Unpickling this calls os.makedirs: what a malicious checkpoint would do with a worse function."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_unsafe_pickle_and_yaml_are_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"encoder.pos_embed": _MakesADirectory(str(marker))}}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match="makedirs"):
        load_torch_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    variant = tmp_path / "variant.yml"
    variant.write_text(f"net_kwargs: !!python/object/apply:os.makedirs ['{marker}']\n")
    with pytest.raises(ValueError, match="not a safe variant.yml"):
        read_variant(variant)
    assert not marker.exists()
    # the original's own file, with its !!python/tuple, reads
    assert read_variant(FIXTURE / "variant.yml")["net_kwargs"]["image_size"] == (64, 64)


def test_distilled_variant_is_refused_with_the_reason(tmp_path):
    variant = (FIXTURE / "variant.yml").read_text().replace("distilled: false", "distilled: true")
    checkpoint = _copy_fixture(tmp_path, variant_text=variant)
    with pytest.raises(ValueError, match="distillation token"):
        convert_segmenter(checkpoint, tmp_path / "out")


def test_cli(tmp_path, capsys):
    checkpoint = _copy_fixture(tmp_path)
    assert cli_main(["convert-segmenter", str(checkpoint), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    assert cli_main(["convert-segmenter", str(tmp_path / "missing.pth"), str(tmp_path / "other")]) == 1
    assert "no checkpoint at" in capsys.readouterr().out
