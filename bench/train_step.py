"""Training-step time and peak memory: our Mask2Former vs transformers' on the same weights, in one process.

    python bench/train_step.py --device cuda --model swin-t --batch-size 8 --size 1024 --autocast bfloat16
    python bench/train_step.py --model tiny-swin --batch-size 2 --size 128     # a CPU run at a small size

One step = forward with labels (matching + loss) under autocast when asked, backward, AdamW step, zero_grad. Each
image gets ``--targets`` random rectangles as target masks (an LSJ-sized crop when ``--size 1024``). After
``--warmup`` untimed steps per model (which also allocate the optimizer state), the models alternate for
``--steps`` timed steps (synchronised on CUDA); the median is reported. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during one step above what was allocated before it (weights, gradients' storage
and optimizer state stay allocated between steps and are in the "before"), and the absolute peak; on the CPU the
peak RSS above the start (bench/model.py's sampler). Models are built from ``hub_configs/`` (random weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# bench/ is sys.path[0] when a bench script runs (python bench/X.py)
from model import autocast_context, build_models, load_config, peak_memory_of, synchronize


def make_targets(
    batch_size: int, size: int, num_labels: int, num_targets: int, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image ``num_targets`` rectangles: mask_labels `(N, size, size)` float and class_labels `(N,)` long."""
    generator = torch.Generator().manual_seed(seed)
    mask_labels, class_labels = [], []
    for _ in range(batch_size):
        masks = torch.zeros(num_targets, size, size)
        corners = torch.randint(0, size // 2, (num_targets, 2), generator=generator)
        extents = torch.randint(size // 8, size // 2, (num_targets, 2), generator=generator)
        for index, ((top, left), (height, width)) in enumerate(zip(corners.tolist(), extents.tolist())):
            masks[index, top : top + height, left : left + width] = 1
        mask_labels.append(masks.to(device))
        class_labels.append(torch.randint(0, num_labels, (num_targets,), generator=generator).to(device))
    return mask_labels, class_labels


def compare_training_step(
    models: dict[str, torch.nn.Module],
    pixel_values: torch.Tensor,
    mask_labels: list[torch.Tensor],
    class_labels: list[torch.Tensor],
    steps: int,
    warmup: int,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, object]:
    """Median step time (ms), peak memory (MiB) and first loss of each model; the models alternate."""
    device = pixel_values.device
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}

    def step(name: str) -> torch.Tensor:
        with autocast_context(device, autocast_dtype):
            loss = models[name](pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss.detach()

    for model in models.values():
        model.train()
    first_loss = {name: float(step(name)) for name in models}
    for _ in range(max(warmup - 1, 0)):
        for name in models:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name in models:
            synchronize(device)
            start = time.perf_counter()
            step(name)
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    result: dict[str, object] = {}
    for name in models:
        peak = peak_memory_of(lambda name=name: step(name), device)
        absolute = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        result[name] = {
            "median_ms": statistics.median(times[name]),
            "min_ms": min(times[name]),
            "peak_mib": peak / 2**20,
            "absolute_peak_mib": absolute,
            "first_loss": first_loss[name],
        }
    if len(models) == 2:
        ours, theirs = list(models)
        result["speedup"] = result[theirs]["median_ms"] / result[ours]["median_ms"]
        result["peak_ratio"] = result[ours]["peak_mib"] / max(result[theirs]["peak_mib"], 1e-9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin-t", help="a bench/model.py MODELS name or a config folder")
    parser.add_argument("--size", type=int, default=1024, help="square crop side (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--targets", type=int, default=10, help="target masks per image")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="autocast dtype")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = load_config(args.model)
    ours, reference = build_models(config, device)
    pixel_values = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    mask_labels, class_labels = make_targets(args.batch_size, args.size, config.num_labels, args.targets, device)
    autocast_dtype = getattr(torch, args.autocast) if args.autocast else None
    result = compare_training_step({"ours": ours, "transformers": reference}, pixel_values, mask_labels, class_labels,
                                   args.steps, args.warmup, autocast_dtype)  # fmt: skip
    print(f"{args.model} training step, batch {args.batch_size}, {args.size}², {args.device}, {args.autocast=}")
    for name in ("ours", "transformers"):
        figures = result[name]
        print(
            f"  {name:>12}: median {figures['median_ms']:8.1f} ms (min {figures['min_ms']:.1f}), "
            f"peak +{figures['peak_mib']:.0f} MiB, first loss {figures['first_loss']:.3f}"
        )
    print(f"  speed-up (transformers / ours): {result['speedup']:.2f}x; peak memory ours / transformers "
          f"{result['peak_ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
