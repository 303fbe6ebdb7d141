"""The CUDA kernels against the reference: parity, gradcheck, dtypes, streams and graph capture, large grids,
non-contiguous and empty inputs, the level limit, torch.compile.

On a GPU machine (after `pip install --no-build-isolation -e .` with a CUDA torch):
`pytest tests/modeling/ops/test_ms_deform_attn_cuda.py`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mask2former.modeling.ops import (
    active_backend,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
    use_backend,
)

pytestmark = pytest.mark.gpu

SHAPES = [(7, 5), (4, 3), (1, 2)]


def make_inputs(head_dim=32, dtype=torch.float64, batch_size=2, num_queries=9, num_heads=3, num_points=4):
    num_values = sum(height * width for height, width in SHAPES)
    value = torch.randn(batch_size, num_values, num_heads, head_dim, dtype=dtype, device="cuda")
    locations = torch.rand(batch_size, num_queries, num_heads, len(SHAPES), num_points, 2, dtype=dtype, device="cuda")
    locations = locations * 1.6 - 0.3  # some corners outside every map
    weights = torch.rand(batch_size, num_queries, num_heads, len(SHAPES), num_points, dtype=dtype, device="cuda")
    return [t.requires_grad_() for t in (value, locations, weights)]


def run_both(value, locations, weights, shapes=SHAPES):
    shapes_tensor = torch.tensor(shapes, device="cuda")
    with use_backend("compiled"):
        ours = multi_scale_deformable_attention(value, shapes_tensor, locations, weights)
    reference = multi_scale_deformable_attention_reference(value, shapes, locations, weights)
    grad_output = torch.randn_like(reference)
    our_grads = torch.autograd.grad(ours, (value, locations, weights), grad_output)
    reference_grads = torch.autograd.grad(reference, (value, locations, weights), grad_output)
    return ours, reference, our_grads, reference_grads


def test_cuda_backend_is_active():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert active_backend("cuda", dtype) == "compiled"


# 32: one warp per head (exclusive stores); 64: two warps per head (atomics after the shuffle);
# 8: four heads per warp; 6: no aligned grouping (per-lane atomics).
@pytest.mark.parametrize("head_dim", [32, 64, 8, 6])
def test_float64_matches_reference(head_dim):
    ours, reference, our_grads, reference_grads = run_both(*make_inputs(head_dim=head_dim))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    for our_grad, reference_grad in zip(our_grads, reference_grads):
        torch.testing.assert_close(our_grad, reference_grad, rtol=0, atol=1e-8)


@pytest.mark.parametrize("head_dim", [32, 6])
def test_float32_matches_reference(head_dim):
    ours, reference, our_grads, reference_grads = run_both(*make_inputs(head_dim=head_dim, dtype=torch.float32))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for our_grad, reference_grad in zip(our_grads, reference_grads):
        torch.testing.assert_close(our_grad, reference_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32_reference(dtype):
    value, locations, weights = make_inputs(dtype=torch.float32)
    low = [t.detach().to(dtype).requires_grad_() for t in (value, locations, weights)]
    with use_backend("compiled"):
        ours = multi_scale_deformable_attention(low[0], torch.tensor(SHAPES, device="cuda"), low[1], low[2])
    assert ours.dtype == dtype
    # The reference on the same rounded inputs in fp32: only the kernel's own rounding differs.
    rounded = [t.detach().float().requires_grad_() for t in low]
    reference = multi_scale_deformable_attention_reference(rounded[0], SHAPES, rounded[1], rounded[2])
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(ours.float(), reference, rtol=tolerance, atol=tolerance)
    grad_output = torch.randn_like(reference)
    our_grads = torch.autograd.grad(ours, low, grad_output.to(dtype))
    reference_grads = torch.autograd.grad(reference, rounded, grad_output)
    for our_grad, reference_grad in zip(our_grads, reference_grads):
        scale = reference_grad.abs().max()
        torch.testing.assert_close(our_grad.float() / scale, reference_grad / scale, rtol=0, atol=5 * tolerance)


def test_gradcheck_float64():
    value, locations, weights = make_inputs(head_dim=4, num_queries=3, num_heads=2, num_points=2)
    with torch.no_grad():
        locations.copy_(torch.rand_like(locations) * 0.9 + 0.05)
    shapes = torch.tensor(SHAPES, device="cuda")

    def function(v, loc, w):
        return torch.ops.mask2former.ms_deform_attn_forward(v, shapes, loc, w)

    assert torch.autograd.gradcheck(function, (value, locations, weights), eps=1e-6, atol=1e-6)


def test_runs_on_the_current_stream():
    value, locations, weights = make_inputs(dtype=torch.float32)
    shapes = torch.tensor(SHAPES, device="cuda")
    expected = torch.ops.mask2former.ms_deform_attn_forward(value, shapes, locations, weights)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        output = torch.ops.mask2former.ms_deform_attn_forward(value, shapes, locations, weights)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(output, expected)


def test_torch_compile_fullgraph_on_cuda():
    value, locations, weights = make_inputs(dtype=torch.float32)
    shapes = torch.tensor(SHAPES, device="cuda")

    def function(v, loc, w):
        return multi_scale_deformable_attention(v, shapes, loc, w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True)
    torch.testing.assert_close(compiled(value, locations, weights), function(value, locations, weights))


def test_bad_dtype_raises_with_shape():
    value, locations, weights = make_inputs()
    shapes = torch.tensor(SHAPES, device="cuda")
    with pytest.raises(RuntimeError, match=r"unsupported dtype .* for value of shape \[2, 49, 3, 32\]"):
        torch.ops.mask2former.ms_deform_attn_forward(value.int(), shapes, locations.int(), weights.int())


def test_captures_in_a_cuda_graph():
    """Graph capture runs on a side stream and rejects work on the legacy default stream or a host sync, so this also
    checks that forward and backward launch on torch's current stream and never read a device tensor on the host."""
    value, locations, weights = (t.detach() for t in make_inputs(dtype=torch.float32))
    shapes = torch.tensor(SHAPES, device="cuda")
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], device="cuda")
    operators = torch.ops.mask2former

    def run():
        output = operators.ms_deform_attn_forward(value, shapes, locations, weights)
        return output, operators.ms_deform_attn_backward(value, shapes, locations, weights, grad_output)

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_output, captured_grads = run()
    # New inputs in the captured buffers, then replay: the graph must compute from them.
    value.copy_(torch.randn_like(value))
    locations.copy_(torch.rand_like(locations))
    graph.replay()
    torch.cuda.synchronize()
    expected_output, expected_grads = run()
    torch.testing.assert_close(captured_output, expected_output)
    for captured, expected in zip(captured_grads, expected_grads):
        torch.testing.assert_close(captured, expected)


def test_more_than_65535_blocks():
    """A launch of ~70,000 blocks of 256 threads (more than a grid's y/z limit) covers every output element."""
    value, locations, weights = make_inputs(head_dim=256, dtype=torch.float32, batch_size=1, num_queries=70_000,
                                            num_heads=1, num_points=1)  # fmt: skip
    ours, reference, our_grads, reference_grads = run_both(value, locations, weights)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # The value gradient sums ~70,000 samples per row with atomics in any order: fp32 rounding of such sums.
    for our_grad, reference_grad in zip(our_grads, reference_grads):
        torch.testing.assert_close(our_grad, reference_grad, rtol=1e-3, atol=1e-2)


def test_non_contiguous_inputs():
    value, locations, weights = (t.detach() for t in make_inputs(dtype=torch.float64))
    # Same values, other memory layouts: value stored (B, h, S, D), locations and weights as strided slices.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    locations_nc = torch.cat([locations, locations], dim=-1)[..., :2].detach().requires_grad_()
    weights_nc = torch.cat([weights, weights], dim=-1)[..., : weights.shape[-1]].detach().requires_grad_()
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    ours, reference, our_grads, reference_grads = run_both(value_nc, locations_nc, weights_nc)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    for our_grad, reference_grad in zip(our_grads, reference_grads):
        torch.testing.assert_close(our_grad, reference_grad, rtol=0, atol=1e-8)


def test_no_queries():
    value, locations, weights = (t.detach() for t in make_inputs(dtype=torch.float32, num_queries=0))
    shapes = torch.tensor(SHAPES, device="cuda")
    output = torch.ops.mask2former.ms_deform_attn_forward(value, shapes, locations, weights)
    assert output.shape == (2, 0, 3 * 32)
    grads = torch.ops.mask2former.ms_deform_attn_backward(value, shapes, locations, weights, output)
    assert [grad.shape for grad in grads] == [value.shape, locations.shape, weights.shape]
    assert grads[0].abs().max() == 0


def test_too_many_levels_raise_with_the_limit():
    shapes = [(1, 1)] * 17
    value = torch.randn(1, 17, 1, 4, device="cuda")
    locations = torch.rand(1, 2, 1, 17, 1, 2, device="cuda")
    weights = torch.rand(1, 2, 1, 17, 1, device="cuda")
    with pytest.raises(RuntimeError, match=r"has 17 levels; the CUDA kernels take at most 16"):
        torch.ops.mask2former.ms_deform_attn_forward(value, torch.tensor(shapes, device="cuda"), locations, weights)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device():
    value, locations, weights = (t.detach().to("cuda:1") for t in make_inputs(dtype=torch.float64))
    with torch.cuda.device(0):  # the current device is another one: the binding's device guard must switch
        output = torch.ops.mask2former.ms_deform_attn_forward(value, torch.tensor(SHAPES, device="cuda:1"),
                                                              locations, weights)  # fmt: skip
    reference = multi_scale_deformable_attention_reference(value, SHAPES, locations, weights)
    assert output.device == value.device
    torch.testing.assert_close(output, reference, rtol=0, atol=1e-10)
