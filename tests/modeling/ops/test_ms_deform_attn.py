"""The compiled deformable-attention op (CPU) against the grid_sample reference and transformers' function."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import (
    multi_scale_deformable_attention as transformers_multi_scale_deformable_attention,
)

from mask2former.modeling.ops import (
    EXTENSION_AVAILABLE,
    active_backend,
    extension_status,
    force_reference,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
    use_backend,
)
from mask2former.modeling.ops import ms_deform_attn as dispatch_module

# Odd, non-square levels; the model's levels are (H/8, H/16, H/32) but the op must not care.
ODD_SHAPES = [(7, 5), (4, 3), (1, 2)]


def make_inputs(
    shapes=ODD_SHAPES,
    batch_size=2,
    num_queries=9,
    num_heads=3,
    head_dim=32,
    num_points=4,
    dtype=torch.float64,
    spread=0.3,
    requires_grad=True,
):
    """Random inputs whose locations reach `spread` beyond [0, 1] on every side (so some corners fall outside)."""
    num_values = sum(height * width for height, width in shapes)
    num_levels = len(shapes)
    value = torch.randn(batch_size, num_values, num_heads, head_dim, dtype=dtype)
    locations = torch.rand(batch_size, num_queries, num_heads, num_levels, num_points, 2, dtype=dtype)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(batch_size, num_queries, num_heads, num_levels, num_points, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (value, locations, weights)]


def compiled_op(value, shapes, locations, weights):
    """The function on the compiled path, failing (not falling back) if the extension cannot run these inputs."""
    with use_backend("compiled"):
        return multi_scale_deformable_attention(value, shapes, locations, weights)


def grads(function, inputs, grad_output):
    output = function(*inputs)
    tensors = [inputs[0], inputs[2], inputs[3]]
    return output, torch.autograd.grad(output, tensors, grad_output)


def assert_matches_reference(shapes, value, locations, weights, forward_tol, grad_tol):
    inputs = (value, shapes, locations, weights)
    reference_output = multi_scale_deformable_attention_reference(*inputs)
    grad_output = torch.randn_like(reference_output)
    output, our_grads = grads(compiled_op, inputs, grad_output)
    _, reference_grads = grads(multi_scale_deformable_attention_reference, inputs, grad_output)
    torch.testing.assert_close(output, reference_output, rtol=0, atol=forward_tol)
    for name, ours, theirs in zip(("value", "sampling_locations", "attention_weights"), our_grads, reference_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=grad_tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_extension_is_built():
    assert EXTENSION_AVAILABLE, extension_status()
    assert active_backend("cpu", torch.float32) == "compiled"
    assert active_backend("cpu", torch.float64) == "compiled"
    assert active_backend("cpu", torch.float16) == "reference"  # no CPU fp16 kernel: the reference runs it


@pytest.mark.parametrize("head_dim", [32, 6], ids=["vectorised", "any_head_dim"])
def test_float64_matches_reference_and_transformers(head_dim):
    value, locations, weights = make_inputs(head_dim=head_dim)
    assert_matches_reference(ODD_SHAPES, value, locations, weights, forward_tol=1e-10, grad_tol=1e-8)
    # transformers' function is the second oracle (and takes the shapes as a tensor, as the model passes them)
    shapes_tensor = torch.tensor(ODD_SHAPES)
    torch.testing.assert_close(
        compiled_op(value, shapes_tensor, locations, weights),
        transformers_multi_scale_deformable_attention(value, ODD_SHAPES, locations, weights),
        rtol=0,
        atol=1e-10,
    )


@pytest.mark.parametrize("head_dim", [32, 5])
def test_float32_matches_reference(head_dim):
    value, locations, weights = make_inputs(head_dim=head_dim, dtype=torch.float32)
    # Location gradients are sums over channels scaled by the level size: an absolute 1e-5 is too tight for them.
    inputs = (value, ODD_SHAPES, locations, weights)
    reference_output = multi_scale_deformable_attention_reference(*inputs)
    grad_output = torch.randn_like(reference_output)
    output, our_grads = grads(compiled_op, inputs, grad_output)
    _, reference_grads = grads(multi_scale_deformable_attention_reference, inputs, grad_output)
    torch.testing.assert_close(output, reference_output, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(our_grads, reference_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


def test_bfloat16_forward_and_backward_close_to_float32_reference():
    value, locations, weights = make_inputs(dtype=torch.float32, requires_grad=False)
    as_bf16 = [t.to(torch.bfloat16).requires_grad_() for t in (value, locations, weights)]
    output = compiled_op(as_bf16[0], ODD_SHAPES, as_bf16[1], as_bf16[2])
    assert output.dtype == torch.bfloat16
    # The reference on the same (rounded) inputs in fp32: only the kernel's own rounding differs.
    rounded = [t.detach().float().requires_grad_() for t in as_bf16]
    reference = multi_scale_deformable_attention_reference(rounded[0], ODD_SHAPES, rounded[1], rounded[2])
    torch.testing.assert_close(output.float(), reference, rtol=2e-2, atol=2e-2)
    grad_output = torch.randn_like(reference)
    ours = torch.autograd.grad(output, as_bf16, grad_output.to(torch.bfloat16))
    theirs = torch.autograd.grad(reference, rounded, grad_output)
    for our_grad, their_grad in zip(ours, theirs):
        scale = their_grad.abs().max()
        torch.testing.assert_close(our_grad.float() / scale, their_grad / scale, rtol=0, atol=3e-2)


def test_gradcheck_float64():
    value, locations, weights = make_inputs(
        shapes=[(3, 4), (2, 1)], batch_size=2, num_queries=2, num_heads=2, head_dim=3, num_points=2
    )
    shapes = torch.tensor([(3, 4), (2, 1)])
    # Keep locations away from pixel-grid lines, where bilinear sampling is not differentiable.
    with torch.no_grad():
        locations.copy_(torch.rand_like(locations) * 0.9 + 0.05)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: compiled_op(v, shapes, loc, w), (value, locations, weights), eps=1e-6, atol=1e-6
    )


def test_opcheck():
    value, locations, weights = make_inputs(shapes=[(3, 4), (2, 1)], num_queries=3, num_heads=2, head_dim=4)
    shapes = torch.tensor([(3, 4), (2, 1)])
    torch.library.opcheck(torch.ops.mask2former.ms_deform_attn_forward.default, (value, shapes, locations, weights))
    grad_output = torch.randn(2, 3, 2 * 4, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.mask2former.ms_deform_attn_backward.default,
        (value.detach(), shapes, locations.detach(), weights.detach(), grad_output),
    )


def test_backward_fake_gives_the_real_strides():
    """The CPU backward returns head-major location/weight gradients as (B, Q, h, ...) views; the fake must agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    value, locations, weights = make_inputs(shapes=[(3, 4), (2, 1)], num_queries=5, num_heads=3, head_dim=4)
    shapes = torch.tensor([(3, 4), (2, 1)])
    grad_output = torch.randn(2, 5, 3 * 4, dtype=torch.float64)
    inputs = (value.detach(), shapes, locations.detach(), weights.detach(), grad_output)
    real = torch.ops.mask2former.ms_deform_attn_backward(*inputs)
    with FakeTensorMode() as mode:
        fake = torch.ops.mask2former.ms_deform_attn_backward(*(mode.from_tensor(tensor) for tensor in inputs))
    for real_tensor, fake_tensor in zip(real, fake):
        assert real_tensor.shape == fake_tensor.shape
        assert real_tensor.stride() == fake_tensor.stride()
    # (h, B, Q, L, P, 2) storage: the heads are the outermost dimension
    assert real[1].stride(2) == real[1].numel() // 3


def test_outside_points_and_exact_integer_coordinates():
    """Corners on the border, points fully outside, and integer pixel coordinates (grid_sample's floor rule)."""
    shapes = [(4, 8), (2, 4)]
    num_queries, num_points = 10, 4
    value, _, weights = make_inputs(shapes=shapes, num_queries=num_queries, num_points=num_points, head_dim=32)
    # Pixel coordinates (x = loc * W - 0.5): integers inside, the -1 / W boundaries, far outside, and fractions.
    pixel_x = torch.tensor([0.0, 1.0, 3.0, -1.0, -1.5, 7.0, 8.0, 9.5, 2.25, -0.5])
    pixel_y = torch.tensor([0.0, 2.0, 3.0, 1.0, -1.0, 4.0, -3.0, 1.5, 3.0, 0.75])
    locations = torch.empty(2, num_queries, 3, len(shapes), num_points, 2, dtype=torch.float64)
    for level, (height, width) in enumerate(shapes):
        x = (pixel_x.roll(level) + 0.5) / width  # exact in binary: W is a power of two
        y = (pixel_y.roll(level) + 0.5) / height
        locations[:, :, :, level, :, 0] = x.view(1, -1, 1, 1).to(torch.float64)
        locations[:, :, :, level, :, 1] = y.view(1, -1, 1, 1).to(torch.float64)
    locations.requires_grad_()
    assert_matches_reference(shapes, value, locations, weights, forward_tol=1e-10, grad_tol=1e-8)
    # A point with every corner outside contributes nothing and gets no gradient: query 6 is at y = -3 on level 0.
    with torch.no_grad():
        only_query_6 = torch.zeros_like(weights)
        only_query_6[:, 6, :, 0] = 1
    output = compiled_op(value, shapes, locations, only_query_6)
    assert output[:, 6].abs().max() == 0


def test_batch_and_decoder_style_queries():
    """Batch > 1 with Q != S (decoder-style calls) and a single point per level."""
    for num_queries, num_points in [(1, 1), (50, 2)]:
        value, locations, weights = make_inputs(batch_size=3, num_queries=num_queries, num_points=num_points)
        assert_matches_reference(ODD_SHAPES, value, locations, weights, forward_tol=1e-10, grad_tol=1e-8)


def test_non_contiguous_inputs():
    value, locations, weights = make_inputs(requires_grad=False)
    # Same values, other memory layouts: value stored (B, h, S, D), locations and weights as strided slices.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    locations_nc = torch.cat([locations, locations], dim=-1)[..., :2].detach().requires_grad_()
    weights_nc = torch.cat([weights, weights], dim=-1)[..., : weights.shape[-1]].detach().requires_grad_()
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    assert_matches_reference(ODD_SHAPES, value_nc, locations_nc, weights_nc, forward_tol=1e-10, grad_tol=1e-8)


@pytest.mark.parametrize("head_dim", [32, 3])
def test_backward_is_independent_of_thread_count(head_dim):
    value, locations, weights = make_inputs(
        shapes=[(16, 16), (8, 8), (4, 4)],
        batch_size=2,
        num_queries=200,
        num_heads=4,
        head_dim=head_dim,
        dtype=torch.float32,
        requires_grad=False,
    )
    shapes = torch.tensor([(16, 16), (8, 8), (4, 4)])
    grad_output = torch.randn(2, 200, 4 * head_dim)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(
                torch.ops.mask2former.ms_deform_attn_backward(value, shapes, locations, weights, grad_output)
            )
            results.append(torch.ops.mask2former.ms_deform_attn_forward(value, shapes, locations, weights))
    finally:
        torch.set_num_threads(previous)
    for other in results[2:]:
        first = results[0] if isinstance(other, tuple) else results[1]
        for ours, theirs in zip(
            other if isinstance(other, tuple) else (other,), first if isinstance(first, tuple) else (first,)
        ):
            assert torch.equal(ours, theirs)  # bitwise


class _EncoderStep(torch.nn.Module):
    """A module shaped like the pixel decoder's use: projections around the op."""

    def __init__(self, shapes, num_heads=2, head_dim=8, num_points=2):
        super().__init__()
        self.shapes = shapes
        self.num_heads, self.head_dim, self.num_points = num_heads, head_dim, num_points
        hidden = num_heads * head_dim
        self.value_proj = torch.nn.Linear(hidden, hidden)
        self.offsets = torch.nn.Linear(hidden, num_heads * len(shapes) * num_points * 2)
        self.weights = torch.nn.Linear(hidden, num_heads * len(shapes) * num_points)

    def forward(self, features: torch.Tensor, spatial_shapes) -> torch.Tensor:
        batch_size, num_values, _ = features.shape
        num_levels = len(self.shapes)
        # (B, S, h*D) -> (B, S, h, D)
        value = self.value_proj(features).view(batch_size, num_values, self.num_heads, self.head_dim)
        # (B, S, h*L*P*2) -> (B, S, h, L, P, 2)
        locations = torch.sigmoid(self.offsets(features)).view(
            batch_size, num_values, self.num_heads, num_levels, self.num_points, 2
        )
        # (B, S, h*L*P) -> (B, S, h, L, P)
        weights = self.weights(features).view(batch_size, num_values, self.num_heads, num_levels * self.num_points)
        weights = weights.softmax(-1).view(batch_size, num_values, self.num_heads, num_levels, self.num_points)
        return multi_scale_deformable_attention(value, spatial_shapes, locations, weights)


@pytest.mark.parametrize("shapes_as_tensor", [False, True], ids=["list", "tensor"])
def test_torch_compile_fullgraph(shapes_as_tensor):
    shapes = [(4, 6), (2, 3)]
    module = _EncoderStep(shapes)
    features = torch.randn(2, 30, 16, requires_grad=True)
    spatial_shapes = torch.tensor(shapes) if shapes_as_tensor else shapes
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    output = compiled(features, spatial_shapes)
    expected = module(features, spatial_shapes)
    torch.testing.assert_close(output, expected)
    # The backward also runs through the registered autograd formula.
    (grad_compiled,) = torch.autograd.grad(output.sum(), features)
    (grad_eager,) = torch.autograd.grad(expected.sum(), features)
    torch.testing.assert_close(grad_compiled, grad_eager)
    with use_backend("reference"):
        reference = module(features, spatial_shapes)
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


def test_torch_export_has_one_op_node():
    shapes = [(4, 6), (2, 3)]
    module = _EncoderStep(shapes).eval()
    features = torch.randn(1, 30, 16)
    exported = torch.export.export(module, (features, shapes))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.mask2former.ms_deform_attn_forward.default in targets
    assert torch.ops.aten.grid_sampler_2d.default not in targets
    torch.testing.assert_close(exported.module()(features, shapes), module(features, shapes))


def _spy_on_reference(monkeypatch) -> list:
    calls = []
    real_reference = dispatch_module.multi_scale_deformable_attention_reference

    def spy(*args):
        calls.append(args)
        return real_reference(*args)

    monkeypatch.setattr(dispatch_module, "multi_scale_deformable_attention_reference", spy)
    return calls


def test_use_backend_reference_runs_the_reference(monkeypatch):
    value, locations, weights = make_inputs(requires_grad=False)
    calls = _spy_on_reference(monkeypatch)
    multi_scale_deformable_attention(value, ODD_SHAPES, locations, weights)
    assert calls == []  # the compiled op ran
    with use_backend("reference"):
        assert active_backend("cpu", torch.float64) == "reference"
        multi_scale_deformable_attention(value, ODD_SHAPES, locations, weights)
    assert len(calls) == 1
    assert active_backend("cpu", torch.float64) == "compiled"  # restored on exit
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cuda-graph"):
            pass


def test_force_reference_is_a_deprecated_alias(monkeypatch):
    value, locations, weights = make_inputs(requires_grad=False)
    calls = _spy_on_reference(monkeypatch)
    with pytest.warns(DeprecationWarning, match=r'use_backend\("reference"\)'), force_reference():
        assert active_backend("cpu", torch.float64) == "reference"
        multi_scale_deformable_attention(value, ODD_SHAPES, locations, weights)
    assert len(calls) == 1
    assert active_backend("cpu", torch.float64) == "compiled"


def test_mixed_dtypes_run_in_the_promoted_dtype():
    value, locations, weights = make_inputs(dtype=torch.float32, requires_grad=False)
    output = multi_scale_deformable_attention(value.bfloat16(), ODD_SHAPES, locations, weights.bfloat16())
    assert output.dtype == torch.float32


def test_bad_inputs_raise_with_shapes():
    value, locations, weights = make_inputs(requires_grad=False)
    with pytest.raises(ValueError, match=r"attention_weights.*\(2, 9, 3, 3, 3\)"):
        multi_scale_deformable_attention(value, ODD_SHAPES, locations, weights[..., :3])
    with pytest.raises(ValueError, match=r"batch size.*value \(1, 49, 3, 32\)"):
        multi_scale_deformable_attention(value[:1], ODD_SHAPES, locations, weights)
    with pytest.raises(ValueError, match=r"sum to 48 positions but value \(2, 49, 3, 32\)"):
        multi_scale_deformable_attention(value, [(7, 5), (4, 3), (1, 1)], locations, weights)
    with pytest.raises(ValueError, match=r"2 levels but sampling_locations has L = 3"):
        multi_scale_deformable_attention(value[:, :-2], ODD_SHAPES[:2], locations, weights)
    with pytest.raises(ValueError, match=r"value of shape \(2, 49, 3, 32\) has dtype torch.int64"):
        multi_scale_deformable_attention(value.long(), ODD_SHAPES, locations, weights)
    # The op itself checks too (its callers may bypass the Python wrapper); tensor shapes are checked in C++.
    with pytest.raises(
        RuntimeError, match=r"spatial_shapes \[3, 2\] sum to H\*W = 48 rows but value \[2, 49, 3, 32\]"
    ):
        torch.ops.mask2former.ms_deform_attn_forward(value, torch.tensor([(7, 5), (4, 3), (1, 1)]), locations, weights)
    with pytest.raises(RuntimeError, match=r"unsupported dtype Half for value of shape \[2, 49, 3, 32\]"):
        torch.ops.mask2former.ms_deform_attn_forward(
            value.half(), torch.tensor(ODD_SHAPES), locations.half(), weights.half()
        )
    with pytest.raises(RuntimeError, match=r"grad_output \[2, 9, 5\] must be"):
        torch.ops.mask2former.ms_deform_attn_backward(
            value, torch.tensor(ODD_SHAPES), locations, weights, torch.zeros(2, 9, 5, dtype=torch.float64)
        )


def test_import_without_extension_falls_back_to_reference():
    """A missing or unloadable extension must not break the import; the reference then runs and says so."""
    code = (
        "import torch, logging; logging.basicConfig(level=logging.INFO)\n"
        "from mask2former.modeling.ops import active_backend, multi_scale_deformable_attention, extension_status\n"
        "assert active_backend('cpu', torch.float32) == 'reference', active_backend('cpu', torch.float32)\n"
        "v = torch.randn(1, 3, 1, 2); loc = torch.rand(1, 2, 1, 1, 1, 2); w = torch.rand(1, 2, 1, 1, 1)\n"
        "for _ in range(2):\n"
        "    multi_scale_deformable_attention(v, [(1, 3)], loc, w)\n"
        "print(extension_status())\n"
    )
    environment = dict(os.environ, MASK2FORMER_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "compiled extension unavailable: MASK2FORMER_NO_EXTENSION=1" in result.stdout
    # The active path is logged once, not per call.
    assert result.stderr.count("runs the reference path") == 1, result.stderr
