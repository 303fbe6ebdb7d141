"""Inference latency of one model three ways, in one process: eager PyTorch, torch.compile (inductor), onnxruntime.

    python bench/export.py                                   # Swin-T COCO-panoptic size, 512x512, batch 1
    python bench/export.py --config hub_configs/tiny-resnet-coco-panoptic --size 256   # quick

The model has random weights built from a hub_configs folder (nothing is downloaded). Latency is the median of
``--iterations`` timed forwards after ``--warmup`` untimed ones, the three runners alternating in each round so that
load from other processes hits them alike. The ONNX file is exported with static shapes (Swin's window padding in
transformers' backbone specialises dynamic sizes; the tiny ResNet configs export with dynamic shapes, see the tests).
Prints latencies, ratios against eager, one-off compile/export times and the largest output difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from mask2former.modeling.export import InferenceGraph, OnnxRuntimeMask2Former, export_onnx
from mask2former.modeling.ops import active_backend

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", type=Path, default=REPO_ROOT / "hub_configs" / "mask2former-swin-tiny-coco-panoptic"
    )
    parser.add_argument("--size", type=int, default=512, help="square input size (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out (it takes minutes)")
    args = parser.parse_args()
    if args.size % 32:
        raise ValueError(f"--size must be a multiple of 32, got {args.size}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig.from_pretrained(args.config)).eval()
    graph = InferenceGraph(model).eval()
    pixel_values = torch.randn(args.batch_size, 3, args.size, args.size)
    print(f"config {args.config.name}, input {tuple(pixel_values.shape)}, {args.threads} threads, ", end="")
    print(f"deformable attention: {active_backend(pixel_values.device, pixel_values.dtype)} (eager/compiled)")

    runners: dict[str, object] = {"eager": graph}
    setup_seconds: dict[str, float] = {}
    if not args.skip_compile:
        compiled = torch.compile(graph, fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(pixel_values)  # compilation happens on the first call
        setup_seconds["compiled"] = time.perf_counter() - start
        runners["compiled"] = compiled
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "model.onnx", pixel_values, dynamic_batch=False, dynamic_size=False)
        setup_seconds["onnxruntime (export)"] = time.perf_counter() - start
        session = OnnxRuntimeMask2Former(path, num_threads=args.threads)
        runners["onnxruntime"] = lambda pixels: (
            (outputs := session(pixels)).class_queries_logits,
            outputs.masks_queries_logits,
        )

        with torch.no_grad():
            reference = graph(pixel_values)
            for name, runner in runners.items():
                output = runner(pixel_values)
                difference = max((a - b).abs().max().item() for a, b in zip(output, reference))
                print(f"{name:>12}: max |output - eager| = {difference:.2e}")
            for _ in range(args.warmup):
                for runner in runners.values():
                    runner(pixel_values)
            timings: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.iterations):
                for name, runner in runners.items():
                    start = time.perf_counter()
                    runner(pixel_values)
                    timings[name].append(time.perf_counter() - start)

    eager_median = statistics.median(timings["eager"])
    for name, durations in timings.items():
        median = statistics.median(durations)
        print(f"{name:>12}: {median * 1000:8.1f} ms  ({eager_median / median:.2f}x eager speed)")
    for name, seconds in setup_seconds.items():
        print(f"one-off {name}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
