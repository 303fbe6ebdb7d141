"""The CUDA kernels against the reference: parity, gradcheck, dtypes, streams, torch.compile.

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
