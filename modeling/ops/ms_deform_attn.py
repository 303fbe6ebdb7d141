"""Multi-scale deformable attention: the compiled `mask2former` torch ops, with the PyTorch reference as fallback.

The C++/CUDA extension (``mask2former.modeling.ops._C``, built by setup.py) registers two operators in the
``mask2former`` namespace: ``ms_deform_attn_forward`` and ``ms_deform_attn_backward``. This module adds their fake
(meta) kernels and autograd formula with ``torch.library`` so that ``torch.compile(fullgraph=True)`` and
``torch.export`` trace them as single graph nodes, and it chooses, in :func:`active_backend`, which path a call runs:
the compiled op when it is built and has a kernel for the device and dtype, else the reference.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence

import torch

from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

logger = logging.getLogger(__name__)

BACKENDS = ("compiled", "reference")
# Dtypes each device's compiled kernel implements (the C++ side checks the same lists).
_COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_FORWARD_OP_NAME = "mask2former::ms_deform_attn_forward"


def _load_extension() -> str | None:
    """Imports the compiled extension; returns None on success, else why the reference path is used."""
    if os.environ.get("MASK2FORMER_NO_EXTENSION") == "1":
        return "MASK2FORMER_NO_EXTENSION=1"
    try:
        from . import _C  # noqa: F401  (importing registers the ops)
    except ImportError as error:  # not built, or built against another torch: fall back, never fail the import
        return f"the extension is not importable ({error}); build it with `pip install --no-build-isolation -e .`"
    except Exception as error:  # noqa: BLE001  a broken binary must not break `import mask2former`
        return f"the extension failed to load ({type(error).__name__}: {error})"
    if not hasattr(torch.ops.mask2former, "ms_deform_attn_forward") or not hasattr(
        torch.ops.mask2former, "ms_deform_attn_backward"
    ):
        return "the extension is stale (its ops are missing); rebuild it with `pip install --no-build-isolation -e .`"
    return None


def _cpu_head_major(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``like`` `(B, Q, h, ...)`, stored head-major `(h, B, Q, ...)`.

    This is the one place on the Python side that knows the CPU backward's layout: csrc/cpu/binding.cpp allocates the
    location and weight gradients head-major (each (batch, head) task of csrc/cpu/backward.cpp then writes one
    contiguous run) and returns `(B, Q, h, L, P[, 2])` views of them. The fake kernel must give the same strides,
    or graphs compiled against it would assume the wrong layout;
    ``tests/modeling/ops/test_ms_deform_attn.py::test_backward_fake_gives_the_real_strides`` checks that they agree.
    """
    batch_size, num_queries, num_heads, *rest = like.shape
    trailing = range(3, 3 + len(rest))
    # (h, B, Q, ...) -> (B, Q, h, ...)
    return like.new_empty((num_heads, batch_size, num_queries, *rest)).permute(1, 2, 0, *trailing)


_EXTENSION_ERROR = _load_extension()
EXTENSION_AVAILABLE = _EXTENSION_ERROR is None

if EXTENSION_AVAILABLE:

    @torch.library.register_fake("mask2former::ms_deform_attn_forward")
    def _forward_fake(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        batch_size, _, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        # (B, Q, h*D)
        return value.new_empty((batch_size, num_queries, num_heads * head_dim))

    @torch.library.register_fake("mask2former::ms_deform_attn_backward")
    def _backward_fake(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        grad_output: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if value.device.type != "cpu":  # the CUDA kernels return contiguous gradients
            return (
                value.new_empty(value.shape),
                sampling_locations.new_empty(sampling_locations.shape),
                attention_weights.new_empty(attention_weights.shape),
            )
        return value.new_empty(value.shape), _cpu_head_major(sampling_locations), _cpu_head_major(attention_weights)

    def _setup_context(ctx, inputs, output) -> None:
        value, spatial_shapes, sampling_locations, attention_weights = inputs
        ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)

    def _backward(ctx, grad_output: torch.Tensor):
        value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.mask2former.ms_deform_attn_backward(
            value, spatial_shapes, sampling_locations, attention_weights, grad_output.contiguous()
        )
        return grad_value, None, grad_locations, grad_weights

    torch.library.register_autograd("mask2former::ms_deform_attn_forward", _backward, setup_context=_setup_context)


# Process-wide choice set by use_backend() (a plain global, so torch.compile can trace and guard on it);
# MASK2FORMER_MSDA_BACKEND sets its initial value.
_forced_backend: str | None = os.environ.get("MASK2FORMER_MSDA_BACKEND") or None
if _forced_backend not in (None, *BACKENDS):
    logger.warning("ignoring MASK2FORMER_MSDA_BACKEND=%r: expected one of %s", _forced_backend, BACKENDS)
    _forced_backend = None
_logged_paths: set[tuple[str, str, str]] = set()
# Device types with a compiled kernel, looked up once at import: the dispatcher query is not traceable.
_KERNEL_DEVICE_TYPES = frozenset(
    device_type
    for device_type, dispatch_key in _DISPATCH_KEYS.items()
    if EXTENSION_AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(_FORWARD_OP_NAME, dispatch_key)
)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Runs :func:`multi_scale_deformable_attention` on ``backend`` ("compiled" or "reference") inside the block.

    "reference" is what ONNX export needs (the compiled op has no ONNX symbolic; the reference exports through
    ``grid_sample``). "compiled" raises at call time when the extension has no kernel for the inputs.
    The setting is process-wide (not per thread); the environment variable ``MASK2FORMER_MSDA_BACKEND`` sets its
    initial value.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    global _forced_backend
    previous = _forced_backend
    _forced_backend = backend
    try:
        yield
    finally:
        _forced_backend = previous


def force_reference() -> contextlib.AbstractContextManager[None]:
    """Deprecated alias of ``use_backend("reference")``, kept for callers written before :func:`use_backend`."""
    warnings.warn('force_reference() is deprecated; use use_backend("reference")', DeprecationWarning, stacklevel=2)
    return use_backend("reference")


def compiled_supports(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the compiled extension is loaded and has a kernel for ``device`` and ``dtype``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return device_type in _KERNEL_DEVICE_TYPES and dtype in _COMPILED_DTYPES[device_type]


def active_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The path :func:`multi_scale_deformable_attention` takes for inputs on ``device`` in ``dtype``.

    Returns "compiled" or "reference"; honours :func:`use_backend`.
    """
    if _forced_backend is not None:
        return _forced_backend
    return "compiled" if compiled_supports(device, dtype) else "reference"


def extension_status() -> str:
    """One line saying whether the compiled extension is loaded, and why not when it is not."""
    if EXTENSION_AVAILABLE:
        isa = torch.ops.mask2former.cpu_isa()
        return f"compiled extension loaded (CPU kernels: {isa})"
    return f"compiled extension unavailable: {_EXTENSION_ERROR}"


def _log_path_once(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    key = (backend, device.type, str(dtype))
    if key in _logged_paths:
        return
    _logged_paths.add(key)
    reason = "" if backend == "compiled" or EXTENSION_AVAILABLE else f" ({_EXTENSION_ERROR})"
    logger.info("multi-scale deformable attention on %s %s runs the %s path%s", device.type, dtype, backend, reason)


def _shape_error(message: str, value, sampling_locations, attention_weights) -> ValueError:
    return ValueError(
        f"multi_scale_deformable_attention: {message}; got value {tuple(value.shape)} (B, S, h, D), "
        f"sampling_locations {tuple(sampling_locations.shape)} (B, Q, h, L, P, 2), "
        f"attention_weights {tuple(attention_weights.shape)} (B, Q, h, L, P)"
    )


def _check_inputs(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Shape and dtype checks that read no tensor data (so no host sync and no graph break)."""
    tensors = (value, sampling_locations, attention_weights)
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise _shape_error("wrong number of dimensions", *tensors)
    if sampling_locations.shape[-1] != 2:
        raise _shape_error("sampling_locations must end in a dimension of size 2 (x, y)", *tensors)
    if sampling_locations.shape[:5] != attention_weights.shape:
        raise _shape_error("attention_weights must be sampling_locations without its last dimension", *tensors)
    if sampling_locations.shape[0] != value.shape[0] or sampling_locations.shape[2] != value.shape[2]:
        raise _shape_error("batch size B and number of heads h must match", *tensors)
    for name, tensor in zip(("value", "sampling_locations", "attention_weights"), tensors):
        if not tensor.is_floating_point():
            raise ValueError(
                f"multi_scale_deformable_attention: {name} of shape {tuple(tensor.shape)} has dtype {tensor.dtype}; "
                "pass a floating-point tensor (float32, float64, bfloat16 or float16)"
            )
    if isinstance(value_spatial_shapes, torch.Tensor):
        if value_spatial_shapes.dim() != 2 or value_spatial_shapes.shape[1] != 2:
            raise ValueError(
                "multi_scale_deformable_attention: value_spatial_shapes must be (L, 2) as (H, W) per level, got "
                f"shape {tuple(value_spatial_shapes.shape)}"
            )
        num_levels = value_spatial_shapes.shape[0]
    else:
        num_levels = len(value_spatial_shapes)
        # No int(): under torch.export the sizes may be SymInts, which must stay symbolic.
        total = sum(height * width for height, width in value_spatial_shapes)
        if total != value.shape[1]:
            raise ValueError(
                f"multi_scale_deformable_attention: value_spatial_shapes {list(value_spatial_shapes)} sum to "
                f"{total} positions but value {tuple(value.shape)} has S = {value.shape[1]}; pass the (H, W) of "
                "every level flattened into value"
            )
    if num_levels != sampling_locations.shape[3]:
        raise _shape_error(
            f"value_spatial_shapes has {num_levels} levels but sampling_locations has L = "
            f"{sampling_locations.shape[3]}",
            *tensors,
        )


@functools.lru_cache(maxsize=64)
def _spatial_shapes_tensor(shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """`(L, 2)` int64 on ``device``, made once per shape list: a host-to-device copy per call would make every
    call wait for the GPU to finish its queued work (a copy from pageable host memory synchronises the stream)."""
    return torch.tensor(shapes, dtype=torch.long, device=device).view(-1, 2)


def multi_scale_deformable_attention(
    value: torch.Tensor,
    value_spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Samples every level of ``value`` at ``sampling_locations`` and sums the samples with ``attention_weights``.

    Same signature and semantics as transformers' ``multi_scale_deformable_attention`` (bilinear, zero outside each
    map, ``align_corners=False``). Runs the compiled ``mask2former::ms_deform_attn_forward`` op when it is built for
    the inputs' device and dtype (see :func:`active_backend`), else the ``grid_sample`` reference.

    Args:
        value: `(B, S, h, D)` with ``S = sum(H_l * W_l)``, the levels flattened row-major one after another.
        value_spatial_shapes: list of ``(H_l, W_l)`` python ints, or an `(L, 2)` integer tensor. A tensor is moved
            to ``value``'s device but never read on the host by the compiled path (no GPU sync).
        sampling_locations: `(B, Q, h, L, P, 2)`, ``(x, y)`` normalised to ``[0, 1]`` over each level.
        attention_weights: `(B, Q, h, L, P)`.

    Returns:
        `(B, Q, h * D)`, in the promoted dtype of the three inputs.
    """
    _check_inputs(value, value_spatial_shapes, sampling_locations, attention_weights)
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    # Mixed dtypes (autocast keeps reference points in fp32) run in the widest one, as grid_sample would.
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        value, sampling_locations, attention_weights = (
            value.to(dtype),
            sampling_locations.to(dtype),
            attention_weights.to(dtype),
        )
    backend = active_backend(value.device, dtype)
    if not torch.compiler.is_compiling():
        _log_path_once(backend, value.device, dtype)
    if backend == "reference":
        return multi_scale_deformable_attention_reference(
            value, value_spatial_shapes, sampling_locations, attention_weights
        )
    if not compiled_supports(value.device, dtype):
        raise RuntimeError(
            f"use_backend('compiled') but the compiled op has no kernel for {value.device.type} {dtype}: "
            f"{extension_status()}"
        )
    if isinstance(value_spatial_shapes, torch.Tensor):
        # (L, 2) int64 on value's device; a no-op when it is already there.
        spatial_shapes = value_spatial_shapes.to(device=value.device, dtype=torch.long)
    elif torch.compiler.is_compiling():  # traced: the tensor becomes a constant (or symbolic) input of the graph
        spatial_shapes = torch.tensor(value_spatial_shapes, dtype=torch.long, device=value.device).view(-1, 2)
    else:
        spatial_shapes = _spatial_shapes_tensor(tuple(map(tuple, value_spatial_shapes)), value.device)
    return torch.ops.mask2former.ms_deform_attn_forward(value, spatial_shapes, sampling_locations, attention_weights)
