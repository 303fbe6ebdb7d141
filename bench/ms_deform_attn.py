"""Benchmark: compiled multi-scale deformable attention against the grid_sample reference, in one process.

Mask2Former pixel-decoder encoder shapes: levels at strides 8, 16, 32 of the input (padded to a multiple of 32, as
the processor pads), 8 heads x 32 channels, 4 points, one query per value position. Prints min and median
milliseconds of forward and forward+backward for both paths (ours and the reference timed alternately, so drifting
machine speed affects both alike), their ratios, how far our forward is from the reference's (fp32: max absolute
difference; bf16: against the fp32 reference on the same rounded inputs, relative to its largest magnitude), and
the distance of our forward from a memory-bandwidth floor (bytes the forward must move / a measured copy bandwidth).

    python bench/ms_deform_attn.py                       # 512 and 1024 inputs, batch 1 and 2, 1 and 2 threads
    python bench/ms_deform_attn.py --sizes 512 --repeats 20 --threads 1 2
    python bench/ms_deform_attn.py --device cuda --dtype bfloat16 --sizes 512 1024 1333x800 --batches 1 8

A size is a square side or WIDTHxHEIGHT.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mask2former.modeling.ops import (
    extension_status,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
    use_backend,
)

NUM_HEADS = 8
HEAD_DIM = 32
NUM_POINTS = 4
STRIDES = (8, 16, 32)


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"1333x800"`` (width x height) -> (800, 1333), as (height, width)."""
    width, _, height = text.lower().partition("x")
    try:
        return (int(height or width), int(width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a side (512) or WIDTHxHEIGHT (1333x800)") from None


def level_shapes(image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(H, W) of the encoder levels of an input padded to a multiple of 32."""
    height, width = (-(-side // 32) * 32 for side in image_size)
    return [(height // stride, width // stride) for stride in STRIDES]


def make_inputs(image_size: tuple[int, int], batch_size: int, device: str, dtype: torch.dtype, requires_grad: bool):
    """Encoder inputs for an ``(H, W)`` input: every value position is also a query."""
    spatial_shapes = level_shapes(image_size)
    num_values = sum(height * width for height, width in spatial_shapes)
    generator = torch.Generator().manual_seed(0)
    # (B, S, h, D)
    value = torch.randn(batch_size, num_values, NUM_HEADS, HEAD_DIM, generator=generator)
    # As in the encoder: query q is value position q, its reference point is its own pixel centre (normalised),
    # and the learned offsets move each point a couple of pixels of the sampled level; a few land outside.
    centres = []
    for height, width in spatial_shapes:
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        # (H*W, 2) as (x, y) in [0, 1]
        centres.append(torch.stack([(cols.flatten() + 0.5) / width, (rows.flatten() + 0.5) / height], dim=-1))
    # (S, 2) -> (1, Q, 1, 1, 1, 2)
    reference = torch.cat(centres).view(1, num_values, 1, 1, 1, 2)
    # (L, 2): one pixel of each level in normalised units, as (x, y)
    pixel = torch.tensor([[1.0 / width, 1.0 / height] for height, width in spatial_shapes]).view(1, 1, 1, -1, 1, 2)
    offsets = torch.randn(batch_size, num_values, NUM_HEADS, len(STRIDES), NUM_POINTS, 2, generator=generator)
    # (B, Q, h, L, P, 2)
    sampling_locations = reference + 2.0 * offsets * pixel
    # (B, Q, h, L, P)
    attention_weights = torch.rand(batch_size, num_values, NUM_HEADS, len(STRIDES), NUM_POINTS, generator=generator)
    attention_weights = attention_weights / attention_weights.sum((-1, -2), keepdim=True)
    tensors = [
        tensor.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for tensor in (value, sampling_locations, attention_weights)
    ]
    return tensors[0], spatial_shapes, tensors[1], tensors[2]


def time_once(function, device: str) -> float:
    """Wall time of one ``function()`` call in milliseconds (synchronised on CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def time_call(function, repeats: int, device: str) -> tuple[float, float]:
    """(min, median) wall time of ``function()`` in milliseconds, after one warm-up call."""
    function()
    times = [time_once(function, device) for _ in range(repeats)]
    return min(times), statistics.median(times)


def time_pair(ours, reference, repeats: int, device: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(min, median) milliseconds of ``ours()`` and of ``reference()``, timed alternately.

    Alternating the two keeps their ratio honest on a machine whose speed drifts (shared hosts): both see the same
    conditions, instead of one block of repetitions each.
    """
    ours()
    reference()
    times = ([], [])
    for _ in range(repeats):
        times[0].append(time_once(ours, device))
        times[1].append(time_once(reference, device))
    return tuple((min(values), statistics.median(values)) for values in times)


def copy_bandwidth_gbs(device: str) -> float:
    """Read+write bandwidth of a tensor copy (64 MiB; 1 GiB on CUDA, past its L2), in GB/s: the floor's denominator."""
    source = torch.empty((256 if device == "cuda" else 16) * 1024 * 1024, device=device)
    target = torch.empty_like(source)
    best, _ = time_call(lambda: target.copy_(source), 10, device)
    return 2 * source.numel() * source.element_size() / (best * 1e-3) / 1e9


def forward_bytes(value, sampling_locations, attention_weights) -> int:
    """Bytes a forward call must at least touch: read value, locations, weights once; write the output once."""
    output_bytes = value.numel() // value.shape[1] * sampling_locations.shape[1] * value.element_size()
    return sum(t.numel() * t.element_size() for t in (value, sampling_locations, attention_weights)) + output_bytes


def forward_difference(ours: torch.Tensor, inputs: tuple) -> float:
    """fp32/fp64: max |ours - reference|; lower precisions: against the fp32 reference of the same (rounded) inputs,
    divided by the reference's largest magnitude."""
    value, shapes, locations, weights = inputs
    with torch.no_grad():
        if ours.dtype in (torch.float32, torch.float64):
            reference = multi_scale_deformable_attention_reference(value, shapes, locations, weights)
            return (ours - reference).abs().max().item()
        widened = (value.float(), shapes, locations.float(), weights.float())
        reference = multi_scale_deformable_attention_reference(*widened)
        return ((ours.float() - reference).abs().max() / reference.abs().max()).item()


def run_case(
    image_size: tuple[int, int], batch_size: int, device: str, dtype: torch.dtype, repeats: int, bandwidth: float
) -> dict[str, float]:
    """Times one shape on both paths; prints one line and returns its figures (milliseconds, ratios, difference)."""
    value, shapes, locations, weights = make_inputs(image_size, batch_size, device, dtype, requires_grad=True)
    shapes_tensor = torch.tensor(shapes, device=device)

    def ours_forward():
        with torch.no_grad(), use_backend("compiled"):
            return multi_scale_deformable_attention(value, shapes_tensor, locations, weights)

    def reference_forward():
        with torch.no_grad():
            return multi_scale_deformable_attention_reference(value, shapes, locations, weights)

    grad_output = torch.randn(batch_size, locations.shape[1], NUM_HEADS * HEAD_DIM, device=device, dtype=dtype)

    def ours_forward_backward():
        with use_backend("compiled"):
            output = multi_scale_deformable_attention(value, shapes_tensor, locations, weights)
        return torch.autograd.grad(output, (value, locations, weights), grad_output)

    def reference_forward_backward():
        output = multi_scale_deformable_attention_reference(value, shapes, locations, weights)
        return torch.autograd.grad(output, (value, locations, weights), grad_output)

    ours_fwd, ref_fwd = time_pair(ours_forward, reference_forward, repeats, device)
    ours_both, ref_both = time_pair(ours_forward_backward, reference_forward_backward, repeats, device)
    floor_ms = forward_bytes(value, locations, weights) / (bandwidth * 1e9) * 1e3
    difference = forward_difference(ours_forward(), (value.detach(), shapes, locations.detach(), weights.detach()))
    height, width = image_size
    label = f"{width}x{height}" if height != width else str(width)
    print(
        f"{label:>9} {batch_size:>2} {torch.get_num_threads():>2} | "
        f"fwd ours {ours_fwd[0]:8.2f} / {ours_fwd[1]:8.2f}  ref {ref_fwd[0]:8.1f} / {ref_fwd[1]:8.1f}  "
        f"x{ref_fwd[0] / ours_fwd[0]:6.1f} (median x{ref_fwd[1] / ours_fwd[1]:6.1f}) | "
        f"fwd+bwd ours {ours_both[0]:8.2f} / {ours_both[1]:8.2f}  ref {ref_both[0]:8.1f} / {ref_both[1]:8.1f}  "
        f"x{ref_both[0] / ours_both[0]:6.1f} (median x{ref_both[1] / ours_both[1]:6.1f}) | "
        f"floor {floor_ms:6.2f} ms, ours/floor {ours_fwd[0] / floor_ms:4.1f} | difference {difference:.1e}",
        flush=True,
    )
    return {
        "forward_ours_ms": ours_fwd[0],
        "forward_ours_median_ms": ours_fwd[1],
        "forward_reference_ms": ref_fwd[0],
        "forward_reference_median_ms": ref_fwd[1],
        "forward_speedup": ref_fwd[0] / ours_fwd[0],
        "forward_backward_ours_ms": ours_both[0],
        "forward_backward_ours_median_ms": ours_both[1],
        "forward_backward_reference_ms": ref_both[0],
        "forward_backward_reference_median_ms": ref_both[1],
        "forward_backward_speedup": ref_both[0] / ours_both[0],
        "floor_ms": floor_ms,
        "forward_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(512, 512), (1024, 1024)],
                        help="input sizes: a square side or WIDTHxHEIGHT")  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement (min, median)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}; {extension_status()}; device {args.device}; dtype {args.dtype}")
    print("times in ms as min / median; ratios = reference / ours; floor = bytes moved / copy bandwidth")
    print("     size  B  T | forward | forward+backward | bandwidth floor | forward difference")
    thread_counts = args.threads if args.device == "cpu" else [torch.get_num_threads()]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        bandwidth = copy_bandwidth_gbs(args.device)
        print(f"-- {threads} thread(s): copy bandwidth {bandwidth:.1f} GB/s")
        for image_size in args.sizes:
            for batch_size in args.batches:
                run_case(image_size, batch_size, args.device, dtype, args.repeats, bandwidth)


if __name__ == "__main__":
    main()
