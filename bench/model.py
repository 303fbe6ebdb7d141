"""Forward latency and peak memory: our Mask2Former vs transformers' on the same weights, in one process.

    python bench/model.py      # Swin-T COCO-panoptic size, 512x512, batch 1, 2 threads, 10 timed forwards each

Latency: median of ``--iterations`` timed forwards after ``--warmup`` untimed ones, the two models alternating so
that load from other processes hits both alike. Peak memory: the resident set size (RSS, read from /proc/self/statm
by a sampling thread every millisecond) during one forward, minus the RSS just before it (after ``malloc_trim`` gives
freed memory back to the OS). Prints the ratios and how far the outputs differ.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time

import torch
from transformers import Mask2FormerConfig as ReferenceConfig
from transformers import Mask2FormerForUniversalSegmentation as ReferenceModel
from transformers import SwinConfig
from transformers.initialization import no_init_weights

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from mask2former.modeling.ops.ms_deform_attn import active_backend

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def release_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_memory_of(forward) -> int:
    """Peak RSS above the starting RSS while ``forward()`` runs, in bytes."""
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
    forward()
    done.set()
    sampler.join()
    return max(peak, resident_bytes()) - start


def swin_tiny_coco_panoptic() -> Mask2FormerConfig:
    backbone = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(backbone_config=backbone, num_queries=100, num_labels=133)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="square input side (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=10, help="timed forwards per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = swin_tiny_coco_panoptic()
    ours = Mask2FormerForUniversalSegmentation(config).eval()
    with no_init_weights():
        reference = ReferenceModel(ReferenceConfig.from_dict(config.to_dict())).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    pixel_values = torch.randn(args.batch_size, 3, args.size, args.size)
    models = {"ours": ours, "transformers": reference}

    with torch.inference_mode():
        outputs = {name: model(pixel_values) for name, model in models.items()}
        for _ in range(args.warmup - 1):
            for model in models.values():
                model(pixel_values)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.iterations):
            for name, model in models.items():
                start = time.perf_counter()
                model(pixel_values)
                times[name].append(time.perf_counter() - start)
        peaks = {name: peak_memory_of(lambda model=model: model(pixel_values)) for name, model in models.items()}

    latency = {name: statistics.median(values) for name, values in times.items()}
    backend = active_backend(pixel_values.device, pixel_values.dtype)
    print(
        f"Swin-T Mask2Former (COCO panoptic size), {args.batch_size}x3x{args.size}x{args.size}, "
        f"{args.threads} threads, deformable attention: {backend}"
    )
    for name in models:
        print(
            f"  {name:>12}: median {latency[name] * 1000:8.1f} ms "
            f"(min {min(times[name]) * 1000:.1f}, max {max(times[name]) * 1000:.1f}, n={args.iterations}), "
            f"peak RSS +{peaks[name] / 2**20:.0f} MiB"
        )
    print(f"  speed-up (transformers / ours): {latency['transformers'] / latency['ours']:.2f}x")
    print(f"  peak memory ratio (ours / transformers): {peaks['ours'] / max(peaks['transformers'], 1):.2f}")
    for key in ("class_queries_logits", "masks_queries_logits"):
        mine, theirs = outputs["ours"][key], outputs["transformers"][key]
        relative = ((mine - theirs).abs().max() / theirs.abs().max()).item()
        print(f"  {key}: max |ours - transformers| / max |transformers| = {relative:.2e}")


if __name__ == "__main__":
    main()
