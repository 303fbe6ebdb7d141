"""torch.export and ONNX of the inference forward: dynamic shapes, onnxruntime parity, post-processing on its outputs.

The whole-model tests share one tiny model, one exported program and one ONNX file (written through the CLI), so the
slow part (tracing) runs once per module.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mask2former.modeling.export import (
    OnnxRuntimeMask2Former,
    check_pixel_values,
    export_onnx,
    export_program,
)

onnx = pytest.importorskip("onnx", reason="the export extras are part of the dev install")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extras are part of the dev install")


def _run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})


# --- building blocks, independent of the model ------------------------------------------------------------------


class _DeformableAttention(torch.nn.Module):
    """The op's reference with level sizes read from feature maps (symbolic under export), as the model calls it."""

    def forward(self, value, sampling_locations, attention_weights, level0, level1):
        from mask2former.modeling.ops import multi_scale_deformable_attention_reference

        shapes = [(level0.shape[-2], level0.shape[-1]), (level1.shape[-2], level1.shape[-1])]
        return multi_scale_deformable_attention_reference(value, shapes, sampling_locations, attention_weights)


def _deformable_inputs(batch_size: int, height: int, width: int) -> dict[str, torch.Tensor]:
    num_heads, head_dim, num_queries, num_levels, num_points = 2, 4, 7, 2, 3
    level0, level1 = torch.zeros(1, 1, height, width), torch.zeros(1, 1, height // 2, width // 2)
    num_values = height * width + (height // 2) * (width // 2)
    return {
        "value": torch.randn(batch_size, num_values, num_heads, head_dim),
        # some locations fall outside [0, 1], where the op samples zeros
        "sampling_locations": torch.rand(batch_size, num_queries, num_heads, num_levels, num_points, 2) * 1.2 - 0.1,
        "attention_weights": torch.rand(batch_size, num_queries, num_heads, num_levels, num_points),
        "level0": level0,
        "level1": level1,
    }


def test_deformable_attention_reference_exports_to_grid_sample_and_matches_onnxruntime(tmp_path):
    from torch.export import Dim

    batch, height, width = Dim("batch"), Dim("height", min=2, max=256), Dim("width", min=2, max=256)
    module = _DeformableAttention()
    inputs = _deformable_inputs(2, 8, 12)
    program = torch.onnx.export(
        module,
        tuple(inputs.values()),
        dynamo=True,
        input_names=list(inputs),
        dynamic_shapes=(
            {0: batch, 1: Dim("values")},
            {0: batch},
            {0: batch},
            {2: 2 * height, 3: 2 * width},
            {2: height, 3: width},
        ),
        verbose=False,
    )
    path = tmp_path / "deformable_attention.onnx"
    program.save(str(path))
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" in op_types
    assert all(opset.domain in ("", "ai.onnx") for opset in onnx.load(str(path)).opset_import)  # no custom domain
    for batch_size, level_height, level_width in [(2, 8, 12), (3, 16, 6)]:  # the tracing size and another one
        inputs = _deformable_inputs(batch_size, level_height, level_width)
        (actual,) = _run_onnx(path, inputs)
        expected = module(*inputs.values())
        torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-5, rtol=1e-5)


class _MaskedAttention(torch.nn.Module):
    """SDPA with a boolean mask and the model's "empty row attends everywhere" rule."""

    def forward(self, query, key, value, mask_logits):
        attend = mask_logits.sigmoid() >= 0.5  # (B, Q, K)
        empty_row = ~attend.any(-1, keepdim=True)
        attend = attend | empty_row
        # (B, h, Q, D) x (B, h, K, D) with a (B, 1, Q, K) mask -> (B, h, Q, D)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attend[:, None])


def test_sdpa_masked_attention_exports_and_matches_onnxruntime(tmp_path):
    from torch.export import Dim

    def make(batch_size, num_keys):
        mask_logits = torch.randn(batch_size, 5, num_keys)
        mask_logits[:, 0] = -10.0  # a query that attends to nothing falls back to every key
        return {
            "query": torch.randn(batch_size, 2, 5, 8),
            "key": torch.randn(batch_size, 2, num_keys, 8),
            "value": torch.randn(batch_size, 2, num_keys, 8),
            "mask_logits": mask_logits,
        }

    batch, keys = Dim("batch"), Dim("keys")
    module = _MaskedAttention()
    program = torch.onnx.export(
        module,
        tuple(make(2, 12).values()),
        dynamo=True,
        input_names=["query", "key", "value", "mask_logits"],
        dynamic_shapes=({0: batch}, {0: batch, 2: keys}, {0: batch, 2: keys}, {0: batch, 2: keys}),
        verbose=False,
    )
    path = tmp_path / "masked_attention.onnx"
    program.save(str(path))
    for batch_size, num_keys in [(2, 12), (3, 20)]:
        inputs = make(batch_size, num_keys)
        (actual,) = _run_onnx(path, inputs)
        torch.testing.assert_close(torch.from_numpy(actual), module(*inputs.values()), atol=1e-5, rtol=1e-5)


def test_check_pixel_values_names_the_fix():
    with pytest.raises(ValueError, match="multiples of 32"):
        check_pixel_values(torch.zeros(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        check_pixel_values(torch.zeros(3, 64, 64))


def test_export_onnx_fails_with_the_fix_for_a_bad_input_size(tmp_path):
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(torch.nn.Identity(), tmp_path / "x.onnx", torch.zeros(1, 3, 50, 64))


# --- the whole model ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    from mask2former import Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(tiny_config("resnet")).eval()


@pytest.fixture(scope="module")
def onnx_file(tiny_model, tmp_path_factory):
    """The tiny model saved as a checkpoint and exported through `mask2former export-onnx`."""
    from mask2former.commands import main

    folder = tmp_path_factory.mktemp("onnx")
    tiny_model.save_pretrained(folder / "checkpoint")
    output = folder / "model.onnx"
    assert main(["export-onnx", "--model", str(folder / "checkpoint"), str(output)]) == 0  # includes its ORT check
    return output


def _eager(model, pixel_values):
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    return outputs.class_queries_logits, outputs.masks_queries_logits


def test_exported_program_matches_eager_at_other_batch_and_sizes(tiny_model):
    program = export_program(tiny_model, torch.randn(2, 3, 96, 128)).module()
    assert not tiny_model.training  # export_program restores the mode it found
    for shape in [(2, 3, 96, 128), (1, 3, 64, 64), (3, 3, 160, 96)]:  # new values, new batch and sizes
        pixel_values = torch.randn(*shape)
        expected = _eager(tiny_model, pixel_values)
        actual = program(pixel_values)
        for actual_tensor, expected_tensor in zip(actual, expected):
            torch.testing.assert_close(actual_tensor, expected_tensor, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def masked_program(tiny_model):
    """The tiny model exported with a pixel_mask input, traced on an all-ones mask."""
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)  # the processor's dtype: the program keeps the example's
    return export_program(tiny_model, torch.randn(2, 3, 96, 128), pixel_mask=pixel_mask).module()


def test_exported_program_with_an_all_ones_pixel_mask_equals_the_unpadded_model(tiny_model, masked_program):
    for shape in [(2, 3, 96, 128), (1, 3, 64, 64), (3, 3, 160, 96)]:
        pixel_values = torch.randn(*shape)
        pixel_mask = torch.ones(shape[0], *shape[2:], dtype=torch.long)
        expected = _eager(tiny_model, pixel_values)
        for actual_tensor, expected_tensor in zip(masked_program(pixel_values, pixel_mask), expected):
            torch.testing.assert_close(actual_tensor, expected_tensor, atol=1e-5, rtol=1e-5)


def test_exported_program_masks_padding_of_images_that_pad_to_the_input_size(tiny_model, masked_program):
    """Both images round up to 96x128 (one size group): the program equals the eager padding-aware model."""
    pixel_values = torch.randn(2, 3, 96, 128)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[0, 70:] = 0
    pixel_mask[1, :, 100:] = 0
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        unmasked = tiny_model(pixel_values=pixel_values)
    actual = masked_program(pixel_values, pixel_mask)
    torch.testing.assert_close(actual[0], expected.class_queries_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1], expected.masks_queries_logits, atol=1e-5, rtol=1e-5)
    assert (actual[0] - unmasked.class_queries_logits).abs().max() > 1e-4  # the mask does change the result


def test_exported_program_refuses_a_batch_that_needs_the_per_region_run(masked_program):
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[0, 40:] = 0  # rounds up to 64x128: only the eager model runs it exactly
    with pytest.raises(RuntimeError, match="eager model"):
        masked_program(torch.randn(2, 3, 96, 128), pixel_mask)


def _coco_pixel_values(coco_sample_root, shortest_edge: int, longest_edge: int) -> torch.Tensor:
    from PIL import Image

    from mask2former import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    images = [Image.open(path).convert("RGB") for path in sorted((coco_sample_root / "val2017").glob("*.jpg"))]
    return processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("shortest_edge, longest_edge", [(128, 192), (192, 320)])
def test_onnxruntime_matches_pytorch_on_the_coco_sample(
    tiny_model, onnx_file, coco_sample_root, shortest_edge, longest_edge
):
    pixel_values = _coco_pixel_values(coco_sample_root, shortest_edge, longest_edge)
    assert pixel_values.shape[-1] % 32 == 0 and pixel_values.shape[-2] % 32 == 0
    expected = _eager(tiny_model, pixel_values)
    outputs = OnnxRuntimeMask2Former(onnx_file)(pixel_values)
    torch.testing.assert_close(outputs.class_queries_logits, expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.masks_queries_logits, expected[1], atol=1e-4, rtol=0)


def test_post_processing_works_on_onnxruntime_outputs(tiny_model, onnx_file, coco_sample_root):
    from mask2former import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor()
    pixel_values = _coco_pixel_values(coco_sample_root, 128, 192)
    with torch.no_grad():
        eager_outputs = tiny_model(pixel_values=pixel_values)
    onnx_outputs = OnnxRuntimeMask2Former(onnx_file)(pixel_values)
    target_sizes = [(120, 160), (90, 130)]

    semantic_onnx = processor.post_process_semantic_segmentation(onnx_outputs, target_sizes=target_sizes)
    semantic_eager = processor.post_process_semantic_segmentation(eager_outputs, target_sizes=target_sizes)
    for onnx_map, eager_map, size in zip(semantic_onnx, semantic_eager, target_sizes):
        assert tuple(onnx_map.shape) == size
        # logits agree to 1e-4, so at most a handful of near-tie pixels may flip
        assert (onnx_map != eager_map).float().mean() < 1e-3

    # a low threshold so that the random tiny model yields segments to compare
    panoptic_onnx = processor.post_process_panoptic_segmentation(
        onnx_outputs, threshold=0.0, target_sizes=target_sizes
    )
    panoptic_eager = processor.post_process_panoptic_segmentation(
        eager_outputs, threshold=0.0, target_sizes=target_sizes
    )
    for onnx_result, eager_result in zip(panoptic_onnx, panoptic_eager):
        assert [s["label_id"] for s in onnx_result["segments_info"]] == [
            s["label_id"] for s in eager_result["segments_info"]
        ]
        assert (onnx_result["segmentation"] != eager_result["segmentation"]).float().mean() < 1e-3

    instance_onnx = processor.post_process_instance_segmentation(
        onnx_outputs, threshold=0.0, target_sizes=target_sizes
    )
    assert len(instance_onnx) == 2 and tuple(instance_onnx[0]["segmentation"].shape) == target_sizes[0]


def test_onnxruntime_runner_refuses_padded_batches(onnx_file):
    runner = OnnxRuntimeMask2Former(onnx_file)
    pixel_mask = torch.ones(1, 64, 64, dtype=torch.long)
    pixel_mask[:, :, 40:] = 0
    with pytest.raises(ValueError, match="pixel_mask"):
        runner(torch.randn(1, 3, 64, 64), pixel_mask=pixel_mask)
    with pytest.raises(ValueError, match="multiples of 32"):
        runner(torch.randn(1, 3, 64, 60))


def test_cli_rejects_a_size_that_is_not_a_multiple_of_32(tmp_path):
    from mask2former.commands import main

    with pytest.raises(ValueError, match="--height must be a positive multiple of 32"):
        main(["export-onnx", "--model", str(tmp_path), "--height", "100", str(tmp_path / "x.onnx")])
