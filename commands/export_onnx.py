"""``mask2former export-onnx --model ID_OR_DIR out.onnx``: write the inference graph as ONNX and check it.

The graph takes ``pixel_values`` (float32, `(batch, 3, height, width)`, height and width multiples of 32, all three
dynamic) and returns ``class_queries_logits`` and ``masks_queries_logits``. Deformable attention is exported as
standard ``GridSample`` nodes, so the file runs on a stock onnxruntime. After writing, the command runs the file with
onnxruntime on a random input and prints the largest difference from PyTorch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export a Mask2Former checkpoint to ONNX (dynamic batch, height, width) and check it with onnxruntime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="path of the .onnx file to write")
    parser.add_argument("--model", required=True, help="Hub id or local folder of a Mask2Former checkpoint")
    parser.add_argument("--height", type=int, default=96, help="height of the tracing input (multiple of 32)")
    parser.add_argument("--width", type=int, default=128, help="width of the tracing input (multiple of 32)")
    parser.add_argument("--static", action="store_true", help="fix batch, height and width to the tracing input")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size of the tracing input")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (the exporter's default when omitted)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check after writing")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted onnxruntime difference")


def main(args: argparse.Namespace) -> int:
    import torch

    from mask2former import Mask2FormerForUniversalSegmentation
    from mask2former.modeling.export import OnnxRuntimeMask2Former, export_onnx, max_abs_difference

    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % 32:
            raise ValueError(f"--{name} must be a positive multiple of 32, got {value}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")

    model = Mask2FormerForUniversalSegmentation.from_pretrained(args.model).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width, generator=generator)
    path = export_onnx(
        model,
        args.output,
        pixel_values,
        dynamic_batch=not args.static,
        dynamic_size=not args.static,
        opset_version=args.opset,
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.no_check:
        return 0
    # a size other than the tracing one, so a graph that silently specialised to it is caught
    check_height, check_width = (args.height, args.width) if args.static else (args.height + 32, args.width)
    check_batch = args.batch_size if args.static else 1
    check_input = torch.randn(check_batch, 3, check_height, check_width, generator=generator)
    difference = max_abs_difference(model, OnnxRuntimeMask2Former(path), check_input)
    print(f"onnxruntime vs PyTorch on {tuple(check_input.shape)}: max |difference| = {difference:.2e}")
    if difference > args.tolerance:
        print(f"error: the difference exceeds --tolerance {args.tolerance:g}")
        return 1
    return 0
