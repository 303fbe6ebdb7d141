"""Forward latency and peak memory: our Mask2Former vs transformers' on the same weights, in one process.

    python bench/model.py      # Swin-T COCO-panoptic size, 512x512, batch 1, 2 threads, 10 timed forwards each
    python bench/model.py --device cuda --model swin-l --size 1024 --batch-size 8 --autocast bfloat16

Latency: median of ``--iterations`` timed forwards after ``--warmup`` untimed ones, the two models alternating so
that load from other processes hits both alike (synchronised on CUDA). Peak memory: on the CPU the resident set size
(RSS, read from /proc/self/statm by a sampling thread every millisecond) during one forward, minus the RSS just
before it (after ``malloc_trim`` gives freed memory back to the OS); on CUDA ``torch.cuda.max_memory_allocated``
during one forward, minus what was allocated before it (weights and inputs). Prints the ratios and how far the
outputs differ. The models are built from ``hub_configs/`` (random weights).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Mask2FormerConfig as ReferenceConfig
from transformers import Mask2FormerForUniversalSegmentation as ReferenceModel
from transformers.initialization import no_init_weights

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from mask2former.modeling.ops.ms_deform_attn import active_backend

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"
MODELS = {
    "swin-t": "mask2former-swin-tiny-coco-panoptic",
    "swin-l": "mask2former-swin-large-coco-panoptic",
    "tiny-swin": "tiny-swin-coco-panoptic",
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def release_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_rss_of(function: Callable[[], object]) -> int:
    """Peak RSS above the starting RSS while ``function()`` runs, in bytes."""
    release_free_memory()
    start = resident_bytes()
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    function()
    done.set()
    sampler.join()
    return max(peak, resident_bytes()) - start


def peak_memory_of(function: Callable[[], object], device: torch.device) -> int:
    """Peak memory above what was allocated before ``function()`` ran, in bytes (CUDA allocator, else RSS)."""
    if device.type != "cuda":
        return peak_rss_of(function)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    function()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def load_config(model: str) -> Mask2FormerConfig:
    """A ``MODELS`` name or a folder with a config.json."""
    folder = HUB_CONFIGS / MODELS[model] if model in MODELS else Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {model!r}: expected one of {sorted(MODELS)} or a folder with a config.json")
    return Mask2FormerConfig.from_pretrained(folder)


def build_models(config: Mask2FormerConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours with random weights and transformers' model with the same weights, both on ``device``."""
    with device:  # initialise on the device: Swin-L on the CPU takes tens of seconds
        ours = Mask2FormerForUniversalSegmentation(config)
        with no_init_weights():
            reference = ReferenceModel(ReferenceConfig.from_dict(config.to_dict()))
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def relative_difference(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |mine - theirs| / max |theirs|, in fp32."""
    mine, theirs = mine.float(), theirs.float()
    return ((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def compare_forward(
    models: dict[str, torch.nn.Module],
    pixel_values: torch.Tensor,
    iterations: int,
    warmup: int,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, object]:
    """Latency (ms), peak memory (MiB) and output differences of the models on ``pixel_values``, alternating."""
    device = pixel_values.device
    for model in models.values():
        model.eval()
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), autocast_context(device, autocast_dtype):
        outputs = {name: model(pixel_values) for name, model in models.items()}
        for _ in range(max(warmup - 1, 0)):
            for model in models.values():
                model(pixel_values)
        for _ in range(iterations):
            for name, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                model(pixel_values)
                synchronize(device)
                times[name].append((time.perf_counter() - start) * 1e3)
        peaks = {
            name: peak_memory_of(lambda model=model: model(pixel_values), device) for name, model in models.items()
        }
    result: dict[str, object] = {
        name: {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
            "peak_mib": peaks[name] / 2**20,
        }
        for name, values in times.items()
    }
    names = list(models)
    if len(names) == 2:
        ours, theirs = names
        result["speedup"] = result[theirs]["median_ms"] / result[ours]["median_ms"]
        result["peak_ratio"] = peaks[ours] / max(peaks[theirs], 1)
        for key in ("class_queries_logits", "masks_queries_logits"):
            result[f"{key}_relative_difference"] = relative_difference(outputs[ours][key], outputs[theirs][key])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin-t", help=f"one of {sorted(MODELS)} or a config folder")
    parser.add_argument("--size", type=int, default=512, help="square input side (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=10, help="timed forwards per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="autocast dtype")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    ours, reference = build_models(load_config(args.model), device)
    pixel_values = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    autocast_dtype = getattr(torch, args.autocast) if args.autocast else None
    result = compare_forward({"ours": ours, "transformers": reference}, pixel_values, args.iterations, args.warmup,
                             autocast_dtype)  # fmt: skip
    backend = active_backend(device, pixel_values.dtype)
    memory = "peak allocated" if device.type == "cuda" else "peak RSS"
    print(
        f"{args.model} Mask2Former, {args.batch_size}x3x{args.size}x{args.size} on {args.device}"
        f"{f' ({args.threads} threads)' if device.type == 'cpu' else ''}, autocast {args.autocast}, "
        f"deformable attention: {backend}"
    )
    for name in ("ours", "transformers"):
        figures = result[name]
        print(
            f"  {name:>12}: median {figures['median_ms']:8.1f} ms (min {figures['min_ms']:.1f}, "
            f"max {figures['max_ms']:.1f}, n={args.iterations}), {memory} +{figures['peak_mib']:.0f} MiB"
        )
    print(f"  speed-up (transformers / ours): {result['speedup']:.2f}x")
    print(f"  peak memory ratio (ours / transformers): {result['peak_ratio']:.2f}")
    for key in ("class_queries_logits", "masks_queries_logits"):
        print(f"  {key}: max |ours - transformers| / max |transformers| = {result[f'{key}_relative_difference']:.2e}")


if __name__ == "__main__":
    main()
