"""Compile and export a model's inference forward: ``torch.export`` programs, ONNX files and an onnxruntime runner.

The exported graph is the ``pixel_mask=None`` inference path: ``pixel_values (B, 3, H, W)`` in, the outputs of the
model's family (``families.py``: ``export_outputs``) out; for Mask2Former the last layer's
``class_queries_logits (B, Q, K+1)`` and ``masks_queries_logits (B, Q, H/4, W/4)``. Batch, height and width are
dynamic; height and width must be multiples of 32 (the backbone's coarsest stride), which is what the image processor
produces when it pads to ``size_divisor=32``. ``export_program(..., pixel_mask=...)`` adds a ``pixel_mask (B, H, W)``
input: the program then masks padding in the attention layers and is exact (equal to the eager model) for batches
whose images all pad to the input size; it raises at run time on a batch that needs the per-region run
(``padding.py``), which only the eager model does.

Deformable attention goes to ONNX decomposed into standard operators (one ``GridSample`` per feature level): while
exporting, :func:`export_onnx` forces the pure-PyTorch reference implementation of the op (its specification), which
torch.export lowers to ``aten.grid_sampler`` and the dynamo exporter to ONNX ``GridSample``. The file then runs on a
stock onnxruntime (and on any runtime with GridSample, opset >= 16) with no custom-op library to build and ship per
platform, and its numbers are those of the specification. Masked attention is plain matmul/softmax (or SDPA with a
boolean mask), which the exporter maps to standard ONNX operators.

Example::

    from mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from mask2former.modeling.export import OnnxRuntimeMask2Former, export_onnx

    model = Mask2FormerForUniversalSegmentation.from_pretrained("facebook/mask2former-swin-tiny-coco-panoptic")
    export_onnx(model, "mask2former.onnx")
    runner = OnnxRuntimeMask2Former("mask2former.onnx")
    outputs = runner(pixel_values=inputs["pixel_values"])  # what processor.post_process_*_segmentation accepts
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..families import family_for, family_of
from ..utils.optional import require
from . import ops
from .padding import SIZE_DIVISOR as STRIDE  # height and width are multiples of the backbone's coarsest stride

INPUT_NAMES = ("pixel_values",)


class InferenceGraph(nn.Module):
    """The graph that is compiled and exported: ``pixel_values -> the family's export_outputs``.

    Wraps a model of any family (Mask2Former: ``(class_queries_logits, masks_queries_logits)``) so that the exported
    program has one tensor input and tensor outputs only (no labels, no auxiliary predictions, no ModelOutput
    container), which is what ONNX needs.

    Args:
        model (`Mask2FormerForUniversalSegmentation` or another family's model): the model; put it in eval mode
            first.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.output_names = family_of(model.config).export_outputs

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`(B, 3, H, W)` (+ `(B, H, W)` pixel mask) -> the outputs named by ``output_names`` (Mask2Former:
        `(B, Q, K+1)` class logits and `(B, Q, H/4, W/4)` mask logits)."""
        inputs = {"pixel_values": pixel_values}
        if pixel_mask is not None:
            inputs["pixel_mask"] = pixel_mask
        outputs = self.model(**inputs, output_auxiliary_logits=False, return_dict=True)
        return tuple(getattr(outputs, name) for name in self.output_names)


def check_pixel_values(pixel_values: torch.Tensor) -> None:
    """Raises a ValueError unless ``pixel_values`` is a float `(B, 3, H, W)` tensor with H and W multiples of 32."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
    height, width = pixel_values.shape[-2:]
    if height % STRIDE or width % STRIDE:
        raise ValueError(
            f"pixel_values height and width must be multiples of {STRIDE}, got {height}x{width}; pad the images "
            f"(the image processor does with size_divisor={STRIDE}) or resize them"
        )


def example_pixel_values(batch_size: int = 2, height: int = 96, width: int = 128) -> torch.Tensor:
    """A random `(batch_size, 3, height, width)` input to trace with.

    The defaults give batch, height and width distinct values other than 0 and 1, so that tracing does not
    specialise one dimension to another or to a constant.
    """
    return torch.randn(batch_size, 3, height, width)


def dynamic_shapes(
    dynamic_batch: bool = True,
    dynamic_size: bool = True,
    max_batch_size: int = 1024,
    max_size: int = 4096,
    *,
    with_pixel_mask: bool = False,
) -> tuple[dict[int, Any], ...]:
    """The ``dynamic_shapes`` argument of torch.export for ``(pixel_values,)`` or ``(pixel_values, pixel_mask)``.

    Height and width are ``32 * k`` with ``k`` a symbolic integer, so every multiple of 32 up to ``max_size`` is
    accepted by the same program; batch is any size up to ``max_batch_size``. The pixel mask shares the dimensions.
    """
    spec: dict[int, Any] = {}
    if dynamic_batch:
        spec[0] = Dim("batch", min=1, max=max_batch_size)
    if dynamic_size:
        spec[2] = STRIDE * Dim("height_div_32", min=1, max=max_size // STRIDE)
        spec[3] = STRIDE * Dim("width_div_32", min=1, max=max_size // STRIDE)
    if not with_pixel_mask:
        return (spec,)
    # (B, 3, H, W) dims 0, 2, 3 -> (B, H, W) dims 0, 1, 2
    mask_spec = {{0: 0, 2: 1, 3: 2}[axis]: dim for axis, dim in spec.items()}
    return spec, mask_spec


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs the block with ``model`` in eval mode and restores every submodule's training flag after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _prepare(model: nn.Module, pixel_values: torch.Tensor | None) -> tuple[nn.Module, torch.Tensor]:
    if pixel_values is None:
        parameter = next(model.parameters(), None)
        pixel_values = example_pixel_values()
        if parameter is not None:
            pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    check_pixel_values(pixel_values)
    graph = model if isinstance(model, InferenceGraph) else InferenceGraph(model)
    return graph, pixel_values


def export_program(
    model: nn.Module,
    pixel_values: torch.Tensor | None = None,
    *,
    pixel_mask: torch.Tensor | None = None,
    dynamic_batch: bool = True,
    dynamic_size: bool = True,
    max_size: int = 4096,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference forward with dynamic batch, height and width (multiples of 32).

    Deformable attention stays whatever :func:`mask2former.modeling.ops.active_backend` picks: the compiled op is one
    node of the program (through its fake kernel), the reference is plain aten ops.

    Args:
        model (`Mask2FormerForUniversalSegmentation`): the model (exported in eval mode; its mode is restored).
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`, *optional*): the input to trace with; H and W multiples
            of 32. Defaults to a random `(2, 3, 96, 128)` tensor on the model's device and dtype.
        pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): an example mask (int64 like the processor's:
            the program keeps its dtype); the program then takes ``(pixel_values, pixel_mask)``. Exact for batches
            whose images all pad to the input size (all-ones masks, one image, one image size); other batches raise
            at run time (see the module doc).
        dynamic_batch (`bool`): batch size is symbolic.
        dynamic_size (`bool`): height and width are symbolic multiples of 32 up to ``max_size``.
        max_size (`int`): largest height or width the program accepts.
        strict (`bool`): torch.export's strict (TorchDynamo) tracing; non-strict by default.

    Returns:
        `torch.export.ExportedProgram`: ``program.module()(pixel_values)`` (or ``(pixel_values, pixel_mask)``)
        returns ``(class_queries_logits (B, Q, K+1), masks_queries_logits (B, Q, H/4, W/4))``.
    """
    graph, pixel_values = _prepare(model, pixel_values)
    inputs: tuple[torch.Tensor, ...] = (pixel_values,)
    if pixel_mask is not None:
        if tuple(pixel_mask.shape) != (pixel_values.shape[0], *pixel_values.shape[2:]):
            raise ValueError(
                f"pixel_mask must be (batch, height, width) = {(pixel_values.shape[0], *pixel_values.shape[2:])} "
                f"to match pixel_values, got {tuple(pixel_mask.shape)}"
            )
        inputs = (pixel_values, pixel_mask.to(pixel_values.device))
    shapes = dynamic_shapes(dynamic_batch, dynamic_size, max_size=max_size, with_pixel_mask=pixel_mask is not None)
    with _eval_mode(graph), torch.no_grad():
        return torch.export.export(graph, inputs, dynamic_shapes=shapes, strict=strict)


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        require(module, "ONNX export")


def export_onnx(
    model: nn.Module,
    path: str | Path,
    pixel_values: torch.Tensor | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_size: bool = True,
    max_size: int = 4096,
    opset_version: int | None = None,
    optimize: bool = True,
) -> Path:
    """Exports the inference forward to ONNX with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

    Deformable attention is decomposed into standard ONNX ``GridSample`` nodes (the op's reference path is forced
    while exporting), so the file runs on a stock onnxruntime. The graph takes ``pixel_values`` (float32,
    `(batch, 3, height, width)`, height and width multiples of 32) and returns ``class_queries_logits`` and
    ``masks_queries_logits``; :class:`OnnxRuntimeMask2Former` runs it and returns what the image processor's
    post-processing accepts.

    Args:
        model (`Mask2FormerForUniversalSegmentation`): the model (exported in eval mode; its mode is restored).
        path (`str` or `Path`): where to write the `.onnx` file (parent folders are created).
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`, *optional*): the input to trace with; defaults to a
            random `(2, 3, 96, 128)` tensor.
        dynamic_batch, dynamic_size, max_size: see :func:`export_program`.
        opset_version (`int`, *optional*): ONNX opset; the exporter's default (>= 18) when None.
        optimize (`bool`): run the exporter's graph optimisation (constant folding, dead-code removal).

    Returns:
        `Path`: the written file.
    """
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph, pixel_values = _prepare(model, pixel_values)
    # the grid_sample reference of deformable attention: standard ONNX GridSample nodes once exported
    with _eval_mode(graph), torch.no_grad(), ops.use_backend("reference"):
        onnx_program = torch.onnx.export(
            graph,
            (pixel_values,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(dynamic_batch, dynamic_size, max_size=max_size),
            input_names=list(INPUT_NAMES),
            output_names=list(graph.output_names),
            opset_version=opset_version,
            optimize=optimize,
            verbose=False,
        )
    onnx_program.save(str(path))
    return path


class OnnxRuntimeMask2Former:
    """Runs an exported ONNX file with onnxruntime and returns the model's output type.

    ``runner(pixel_values)`` (or ``runner(**processor_inputs)``) returns the family's output type (Mask2Former:
    `Mask2FormerForUniversalSegmentationOutput` with ``class_queries_logits`` and ``masks_queries_logits``) holding
    torch tensors, so ``processor.post_process_{semantic,instance,panoptic}_segmentation`` work on it unchanged.

    The graph has no ``pixel_mask`` input (it is the ``pixel_mask=None`` path): a batch whose mask marks padding is
    refused, since padding would leak into the results; run padded images one at a time (without padding) instead.

    Args:
        path (`str` or `Path`): the `.onnx` file written by :func:`export_onnx`.
        providers (`list[str]`, *optional*): onnxruntime execution providers; CPU by default.
        num_threads (`int`, *optional*): intra-op threads (onnxruntime's default when None).
        model_type (`str`): the family of the exported model (its ``config.model_type``), which gives the output type.
    """

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        num_threads: int | None = None,
        model_type: str = "mask2former",
    ) -> None:
        onnxruntime = require("onnxruntime", "running ONNX files")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no ONNX file at {path}; write one with mask2former.modeling.export.export_onnx first")
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.output_class = family_for(model_type).output_class

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **unused: Any):
        """`(B, 3, H, W)` float pixels -> the family's output (torch tensors, CPU)."""
        pixel_values = torch.as_tensor(pixel_values)
        check_pixel_values(pixel_values)
        if pixel_mask is not None and not bool(torch.as_tensor(pixel_mask).all()):
            raise ValueError(
                "pixel_mask marks padded pixels, but the ONNX graph has no pixel_mask input (padding would leak into "
                "the results); run the padded images one at a time, or with pixel_mask=None if the padding is wanted"
            )
        feeds = {self.input_names[0]: pixel_values.detach().cpu().float().numpy()}
        results = self.session.run(None, feeds)
        return self.output_class(**{name: torch.from_numpy(array) for name, array in zip(self.output_names, results)})


def max_abs_difference(model: nn.Module, runner: OnnxRuntimeMask2Former, pixel_values: torch.Tensor) -> float:
    """Largest absolute difference between eager PyTorch and onnxruntime logits on ``pixel_values``."""
    graph = InferenceGraph(model)
    with _eval_mode(model), torch.no_grad():
        expected = graph(pixel_values)
    actual = runner(pixel_values)
    return max(
        (getattr(actual, name) - tensor.cpu()).abs().max().item() for name, tensor in zip(graph.output_names, expected)
    )
