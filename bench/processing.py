"""Benchmark: our image processor against transformers' (PIL backend) in one process, on the same inputs.

Post-processing: batch 2, 100 queries of which 20 are confident (a Voronoi partition of the image with sharp mask
logits, as a trained model gives; the other queries predict "no object"), 133 classes, mask logits of an 800x1216
padded input (200x304), results at 800x1200. Preprocessing: 4 COCO-sized images with panoptic labels (the two
images of the COCO sample, twice), default sizes (shortest edge 800, longest 1333).

Run: ``python -m mask2former.bench.processing`` (or ``python bench/processing.py``); ``--repeats N``,
``--threads N``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

COCO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-sample"


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
    class_logits = torch.randn(batch_size, num_queries, num_classes + 1, generator=generator)
    class_logits[..., -1] += 8.0  # most queries: "no object"
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
        labels = torch.randint(0, num_classes, (num_confident,), generator=generator)
        class_logits[image, :num_confident, -1] = 0.0
        class_logits[image, torch.arange(num_confident), labels] = 9.0
    return SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)


def best_time(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
    from transformers.utils import logging

    from mask2former import Mask2FormerImageProcessor

    logging.set_verbosity_error()
    ours, reference = Mask2FormerImageProcessor(), Mask2FormerImageProcessorPil()
    outputs = trained_like_outputs()
    target_sizes = [(800, 1200)] * 2
    kept = ours.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes)
    print(
        f"torch threads: {torch.get_num_threads()}; panoptic segments kept: {[len(r['segments_info']) for r in kept]}"
    )
    print(f"{'task':<28}{'ours (s)':>10}{'transformers (s)':>18}{'speed-up':>10}")
    for task in ("panoptic", "instance", "semantic"):
        our_method = getattr(ours, f"post_process_{task}_segmentation")
        their_method = getattr(reference, f"post_process_{task}_segmentation")
        our_time = best_time(lambda method=our_method: method(outputs, target_sizes=target_sizes), args.repeats)
        their_time = best_time(lambda method=their_method: method(outputs, target_sizes=target_sizes), args.repeats)
        print(f"{'post-process ' + task:<28}{our_time:>10.3f}{their_time:>18.3f}{their_time / our_time:>9.1f}x")

    images, pngs, segments, small_maps, mappings = coco_inputs()
    # transformers pads its targets with ignore_index and fails without one.
    ours, reference = Mask2FormerImageProcessor(ignore_index=255), Mask2FormerImageProcessorPil(ignore_index=255)
    our_time = best_time(
        lambda: ours(images, segmentation_maps=pngs, segments_info=segments, return_tensors="pt"), args.repeats
    )
    their_time = best_time(
        lambda: reference(
            images, segmentation_maps=small_maps, instance_id_to_semantic_id=mappings, return_tensors="pt"
        ),
        args.repeats,
    )
    print(f"{'preprocess 4 COCO + labels':<28}{our_time:>10.3f}{their_time:>18.3f}{their_time / our_time:>9.1f}x")


if __name__ == "__main__":
    main()
