"""torch.compile(fullgraph=True) of the deformable-attention op and of the whole inference forward.

``fullgraph=True`` makes any graph break (data-dependent Python control flow, ``.item()``, a host read of a tensor)
an error, so these tests fail when the pixel_mask=None path stops being a single graph. They compile with the
``aot_eager`` backend: it traces through AOTAutograd (fake kernels included) like inductor does, without spending
CI time generating C++; ``bench/export.py`` measures the inductor-compiled model.
"""

import torch

from mask2former.modeling.ops import multi_scale_deformable_attention


def test_compiled_deformable_attention_matches_eager_without_graph_break():
    torch._dynamo.reset()
    shapes = [(8, 12), (4, 6)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 4)
    sampling_locations = torch.rand(2, 5, 2, 2, 3, 2)
    attention_weights = torch.rand(2, 5, 2, 2, 3).softmax(-1)
    spatial_shapes = torch.tensor(shapes)
    compiled = torch.compile(multi_scale_deformable_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(value, spatial_shapes, sampling_locations, attention_weights),
        multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights),
    )


def test_compiled_model_matches_eager_without_graph_break(tiny_config):
    from mask2former import Mask2FormerForUniversalSegmentation

    torch._dynamo.reset()
    model = Mask2FormerForUniversalSegmentation(tiny_config("resnet")).eval()
    # one size: dynamic sizes are covered by the export tests, and each recompile costs CI a minute
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for pixel_values in [torch.randn(2, 3, 96, 128), torch.randn(2, 3, 96, 128)]:  # the second call reuses the graph
        with torch.no_grad():
            expected = model(pixel_values=pixel_values)
            actual = compiled(pixel_values=pixel_values)
        torch.testing.assert_close(actual.class_queries_logits, expected.class_queries_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual.masks_queries_logits, expected.masks_queries_logits, atol=1e-5, rtol=1e-5)
