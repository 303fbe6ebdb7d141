"""Benchmark: our image processor against transformers' (PIL backend) in one process, on the same inputs.

Post-processing, the three tasks on three kinds of model outputs (batch 2, 100 queries, 133 classes):

- ``trained``: what a trained model gives. 20 confident queries partition the image with sharp mask logits (a
  Voronoi partition), the other queries predict "no object" with smooth negative masks; mask logits of an 800x1216
  padded input (200x304), results at 800x1200.
- ``noise``: the adversarial case. The same classes, but every mask logit is independent per-pixel noise (std 3), so
  nearly every 2x2 cell of every mask straddles the threshold and no cell can be decided from its bounds.
- ``untrained``: a randomly initialised Swin-T COCO-panoptic model (seed 0, config and processor from
  ``hub_configs/mask2former-swin-tiny-coco-panoptic``) on the two images of the COCO sample; results at their sizes.

Ours and transformers' run alternately (best of ``--repeats`` each), so load from other processes hits both alike;
the speed-up is transformers' time over ours.

Preprocessing: 4 COCO-sized images with panoptic labels (the two images of the COCO sample, twice), default sizes
(shortest edge 800, longest 1333).

Memory (``--memory``): one 6000x4000 target with 100 and 200 queries (trained-like and noise logits of an 800x1216
input), each task in a fresh process: the peak resident set size (``ru_maxrss``) above the resident size just before
post-processing, minus the result's own bytes.

Run: ``python bench/processing.py`` (``--repeats N``, ``--threads N``, ``--cases trained noise untrained``,
``--memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT.parent / "shared" / "data" / "coco-panoptic-sample"
UNTRAINED_CONFIG = ROOT / "hub_configs" / "mask2former-swin-tiny-coco-panoptic"
TASKS = ("panoptic", "instance", "semantic")


def _class_logits(batch_size: int, num_queries: int, num_confident: int, num_classes: int, generator) -> torch.Tensor:
    """Most queries "no object"; the first `num_confident` peaked on a random class each."""
    class_logits = torch.randn(batch_size, num_queries, num_classes + 1, generator=generator)
    class_logits[..., -1] += 8.0
    for image in range(batch_size):
        labels = torch.randint(0, num_classes, (num_confident,), generator=generator)
        class_logits[image, :num_confident, -1] = 0.0
        class_logits[image, torch.arange(num_confident), labels] = 9.0
    return class_logits


def trained_like_outputs(
    batch_size: int = 2,
    num_queries: int = 100,
    num_confident: int = 20,
    num_classes: int = 133,
    mask_size: tuple[int, int] = (200, 304),
    valid_size: tuple[int, int] = (200, 300),
    seed: int = 0,
) -> SimpleNamespace:
    """Outputs that look like a trained model's: confident queries partition the image with sharp masks."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = _class_logits(batch_size, num_queries, num_confident, num_classes, generator)
    mask_logits = torch.randn(batch_size, num_queries, *mask_size, generator=generator) * 2 - 6.0
    mask_logits = F.avg_pool2d(mask_logits, 5, stride=1, padding=2)  # smooth, negative background masks
    rows, cols = torch.meshgrid(torch.arange(valid_size[0]), torch.arange(valid_size[1]), indexing="ij")
    for image in range(batch_size):
        seeds = torch.rand(num_confident, 2, generator=generator) * torch.tensor(valid_size)
        distance = (rows[None] - seeds[:, 0, None, None]) ** 2 + (cols[None] - seeds[:, 1, None, None]) ** 2
        owner = distance.argmin(0)  # (h, w) Voronoi cell of each pixel
        one_hot = (owner[None] == torch.arange(num_confident)[:, None, None]).float()[None]
        soft = F.avg_pool2d(one_hot, 3, stride=1, padding=1, count_include_pad=False)[0]
        mask_logits[image, :num_confident, : valid_size[0], : valid_size[1]] = (soft - 0.5) * 24
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def noise_outputs(
    batch_size: int = 2,
    num_queries: int = 100,
    num_confident: int = 20,
    num_classes: int = 133,
    mask_size: tuple[int, int] = (200, 304),
    seed: int = 0,
) -> SimpleNamespace:
    """The adversarial case: the trained-like classes with independent per-pixel noise as every mask logit."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = _class_logits(batch_size, num_queries, num_confident, num_classes, generator)
    mask_logits = torch.randn(batch_size, num_queries, *mask_size, generator=generator) * 3
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def untrained_model_outputs() -> tuple[SimpleNamespace, list[tuple[int, int]], object]:
    """A random-initialised Swin-T model's outputs on the COCO sample, its target sizes and processor."""
    from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig.from_pretrained(UNTRAINED_CONFIG)).eval()
    processor = Mask2FormerImageProcessor.from_pretrained(UNTRAINED_CONFIG)
    images = [Image.open(path).convert("RGB") for path in sorted((COCO_SAMPLE / "val2017").glob("*.jpg"))]
    with torch.no_grad():
        outputs = model(**processor(images, return_tensors="pt"))
    logits = SimpleNamespace(
        class_queries_logits=outputs.class_queries_logits, masks_queries_logits=outputs.masks_queries_logits
    )
    return logits, [image.size[::-1] for image in images], processor


def best_time(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def time_alternately(first, second, repeats: int) -> tuple[float, float]:
    """Best times of two functions run in turns, so that machine load drifts hit both alike."""
    first(), second()  # warm-up
    first_times, second_times = [], []
    for _ in range(repeats):
        for function, times in ((first, first_times), (second, second_times)):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return min(first_times), min(second_times)


def coco_inputs():
    panoptic = json.loads((COCO_SAMPLE / "annotations" / "panoptic_val2017.json").read_text())
    images, pngs, segments, small_maps, mappings = [], [], [], [], []
    for annotation in panoptic["annotations"] * 2:
        images.append(
            Image.open(COCO_SAMPLE / "val2017" / annotation["file_name"].replace(".png", ".jpg")).convert("RGB")
        )
        png = Image.open(COCO_SAMPLE / "annotations" / "panoptic_val2017" / annotation["file_name"]).convert("RGB")
        pngs.append(png)
        segments.append(annotation["segments_info"])
        # transformers converts maps to 8-bit images: it needs the segments renumbered 1..N first.
        array = np.asarray(png, dtype=np.int64)
        ids = array[..., 0] + 256 * array[..., 1] + 256 * 256 * array[..., 2]
        small = np.zeros(ids.shape, dtype=np.uint8)
        mapping = {0: 0}
        for number, info in enumerate(annotation["segments_info"], start=1):
            small[ids == info["id"]] = number
            mapping[number] = info["category_id"]
        small_maps.append(small)
        mappings.append(mapping)
    return images, pngs, segments, small_maps, mappings


def post_processing_speed(cases: list[str], repeats: int) -> None:
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from mask2former import Mask2FormerImageProcessor

    reference = Mask2FormerImageProcessorPil()
    print(f"{'outputs':<11}{'task':<10}{'ours (s)':>10}{'transformers (s)':>18}{'speed-up':>10}")
    for case in cases:
        ours = Mask2FormerImageProcessor()
        if case == "untrained":
            outputs, target_sizes, ours = untrained_model_outputs()
        else:
            outputs = trained_like_outputs() if case == "trained" else noise_outputs()
            target_sizes = [(800, 1200)] * 2
        for task in TASKS:
            our_method = getattr(ours, f"post_process_{task}_segmentation")
            their_method = getattr(reference, f"post_process_{task}_segmentation")
            our_time, their_time = time_alternately(
                lambda method=our_method, outputs=outputs, sizes=target_sizes: method(outputs, target_sizes=sizes),
                lambda method=their_method, outputs=outputs, sizes=target_sizes: method(outputs, target_sizes=sizes),
                repeats,
            )
            ratio = their_time / our_time
            print(f"{case:<11}{task:<10}{our_time:>10.3f}{their_time:>18.3f}{ratio:>9.1f}x", flush=True)


def preprocessing_speed(repeats: int) -> None:
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from mask2former import Mask2FormerImageProcessor

    images, pngs, segments, small_maps, mappings = coco_inputs()
    # transformers pads its targets with ignore_index and fails without one.
    ours, reference = Mask2FormerImageProcessor(ignore_index=255), Mask2FormerImageProcessorPil(ignore_index=255)
    our_time, their_time = time_alternately(
        lambda: ours(images, segmentation_maps=pngs, segments_info=segments, return_tensors="pt"),
        lambda: reference(
            images, segmentation_maps=small_maps, instance_id_to_semantic_id=mappings, return_tensors="pt"
        ),
        repeats,
    )
    print(f"{'preprocess 4 COCO + labels':<21}{our_time:>10.3f}{their_time:>18.3f}{their_time / our_time:>9.1f}x")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _result_bytes(result) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, dict) or hasattr(result, "keys"):
        return sum(_result_bytes(value) for value in result.values())
    if isinstance(result, list | tuple):
        return sum(_result_bytes(value) for value in result)
    return 0


def memory_case(task: str, num_queries: int, kind: str) -> None:
    """One post-processing call at 6000x4000 (in this process); prints peak RSS above the start, result excluded."""
    from mask2former import Mask2FormerImageProcessor

    make = trained_like_outputs if kind == "trained" else noise_outputs
    outputs = make(batch_size=1, num_queries=num_queries)
    processor = Mask2FormerImageProcessor()
    method = getattr(processor, f"post_process_{task}_segmentation")
    start_rss = _resident_bytes()
    start = time.perf_counter()
    result = method(outputs, target_sizes=[(6000, 4000)], image_sizes=[(800, 1200)])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    result_bytes = _result_bytes(result)
    print(json.dumps({"above": peak - start_rss - result_bytes, "result": result_bytes, "s": seconds}))


def post_processing_memory() -> None:
    header = f"{'outputs':<9}{'queries':>8}  {'task':<10}{'result (MB)':>12}{'peak above result (MB)':>24}"
    print(f"{header}{'time (s)':>10}")
    for kind in ("trained", "noise"):
        for num_queries in (100, 200):
            for task in TASKS:
                command = [sys.executable, __file__, "--memory-case", task, str(num_queries), kind]
                report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                print(
                    f"{kind:<9}{num_queries:>8}  {task:<10}{report['result'] / 2**20:>12.0f}"
                    f"{report['above'] / 2**20:>24.0f}{report['s']:>10.2f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cases", nargs="+", default=["trained", "noise", "untrained"])
    parser.add_argument("--memory", action="store_true", help="measure memory at 6000x4000 instead of speed")
    parser.add_argument("--memory-case", nargs=3, metavar=("TASK", "QUERIES", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    if args.memory_case:
        task, num_queries, kind = args.memory_case
        memory_case(task, int(num_queries), kind)
        return
    print(f"torch threads: {torch.get_num_threads()}; load average: {os.getloadavg()[0]:.1f}")
    if args.memory:
        post_processing_memory()
        return
    post_processing_speed(args.cases, args.repeats)
    preprocessing_speed(args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
