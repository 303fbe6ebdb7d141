"""Label encoding: an integer segmentation map -> one binary mask and one class id per segment present.

API
---
- ``encode_segmentation_map(map, instance_id_to_semantic_id=None, segments_info=None, ignore_index=None,
  do_reduce_labels=False, padded_size=None)`` -> ``(masks (N, H, W) float, classes (N,) long)``: the three map kinds
  (semantic class ids, instance ids with a class mapping, COCO panoptic ids with their ``segments_info``).
- ``binary_masks(map, ids, padded_size)``: one zero-padded mask per id, by scattering instead of comparing.
- ``present_ids(map)``: the sorted ids of a map.
- ``lazily_zeroed(shape, dtype, device)``: a zero tensor whose CPU pages the OS zeroes on first touch.

Ids are kept as they are (int32/int64): COCO panoptic ids go up to 256^3, which transformers' 8-bit conversion
rejects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def encode_segmentation_map(
    segmentation_map: torch.Tensor,
    instance_id_to_semantic_id: dict[int, int] | None = None,
    segments_info: list[dict[str, Any]] | None = None,
    ignore_index: int | None = None,
    do_reduce_labels: bool = False,
    padded_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An `(H, W)` integer map -> binary masks `(N, H, W)` float and class ids `(N,)` long, one per id present.

    - with `segments_info` (COCO panoptic): one mask per non-crowd segment present, class `category_id`; id 0 is
      void; any other id must be listed;
    - with `instance_id_to_semantic_id`: one mask per instance id present (except `ignore_index`), class mapped;
    - otherwise (semantic): one mask per class id present, except `ignore_index`.

    With `padded_size`, the masks are `(N, *padded_size)` with the map at the top left and zeros elsewhere.
    """
    if do_reduce_labels:
        # 0 ("other") becomes ignored, every other label moves down by one.
        segmentation_map = torch.where(segmentation_map == 0, ignore_index, segmentation_map - 1)
    device = segmentation_map.device
    height, width = segmentation_map.shape
    padded_size = padded_size or (height, width)
    if segments_info is not None:
        listed = [0] + [int(info["id"]) for info in segments_info]
        listed_tensor = torch.tensor(listed, dtype=segmentation_map.dtype, device=device)
        sorted_ids, order = listed_tensor.sort()
        # Position of each pixel's id among the listed ids: (H, W) -> (H, W), and whether it is listed at all.
        position = torch.searchsorted(sorted_ids, segmentation_map).clamp(max=len(listed) - 1)
        listed_pixels = sorted_ids[position] == segmentation_map
        if not bool(listed_pixels.all()):
            missing = torch.unique(segmentation_map[~listed_pixels]).tolist()
            raise ValueError(
                f"segment id(s) {missing[:10]} are in the panoptic map but not in its segments_info (ids "
                f"{listed[1:11]}...); pass the segments_info that belongs to this map."
            )
        areas = torch.bincount(order[position].flatten(), minlength=len(listed)).tolist()
        # Void (0), crowd segments and segments lost by the resize are not targets, as in the original Mask2Former.
        targets = [info for info, area in zip(segments_info, areas[1:]) if area > 0 and not info.get("iscrowd", 0)]
        masks = binary_masks(segmentation_map, [int(info["id"]) for info in targets], padded_size)
        classes = torch.tensor([int(info["category_id"]) for info in targets], dtype=torch.long, device=device)
        return masks, classes
    ids_list = present_ids(segmentation_map)
    kept = [segment_id for segment_id in ids_list if ignore_index is None or segment_id != ignore_index]
    if instance_id_to_semantic_id is not None:
        mapping = {int(key): int(value) for key, value in instance_id_to_semantic_id.items()}
        classes = []
        for segment_id in kept:
            key = segment_id + 1 if do_reduce_labels else segment_id
            if key not in mapping:
                raise ValueError(
                    f"instance id {key} is in the segmentation map but not in instance_id_to_semantic_id; add "
                    "it (ids present: " + ", ".join(str(v) for v in ids_list[:20]) + ")."
                )
            classes.append(mapping[key] - 1 if do_reduce_labels else mapping[key])
    else:
        classes = kept
    masks = binary_masks(segmentation_map, kept, padded_size)
    return masks, torch.tensor(classes, dtype=torch.long, device=device)


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero tensor; on the CPU through numpy's calloc, whose pages are zeroed lazily by the OS (torch.zeros writes
    them all up front, the main cost of large mask batches)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def binary_masks(segmentation_map: torch.Tensor, ids: list[int], padded_size: tuple[int, int]) -> torch.Tensor:
    """`(H, W)` map, `N` ids -> `(N, *padded_size)` float masks, zero in the padding."""
    height, width = segmentation_map.shape
    num_masks, device = len(ids), segmentation_map.device
    # One extra mask collects the pixels of no listed id; it is cut off at the end.
    masks = lazily_zeroed((num_masks + 1, *padded_size), torch.float32, device)
    if num_masks:
        sorted_ids, order = torch.tensor(ids, dtype=segmentation_map.dtype, device=device).sort()
        position = torch.searchsorted(sorted_ids, segmentation_map).clamp(max=num_masks - 1)  # (H, W)
        target = torch.where(sorted_ids[position] == segmentation_map, order[position], num_masks)  # (H, W)
        # Scatter a 1 per pixel into its mask, instead of comparing every pixel with every id.
        rows = torch.arange(height, device=device)[:, None] * padded_size[1]
        pixel = rows + torch.arange(width, device=device)  # (H, W) offsets in a padded mask
        masks.view(-1).index_fill_(0, (target * (padded_size[0] * padded_size[1]) + pixel).flatten(), 1.0)
    return masks[:num_masks]


def present_ids(segmentation_map: torch.Tensor) -> list[int]:
    """The sorted ids of an `(H, W)` map (one host read)."""
    # Small non-negative ids (class and instance maps): a histogram is much faster than sorting.
    smallest, largest = segmentation_map.min().item(), segmentation_map.max().item()
    if smallest >= 0 and largest < 1 << 20:
        return torch.bincount(segmentation_map.flatten(), minlength=1).nonzero()[:, 0].tolist()
    return torch.unique(segmentation_map).tolist()
