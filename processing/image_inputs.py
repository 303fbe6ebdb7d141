"""Processor inputs: images and segmentation maps in any supported form -> tensors, and their resizing.

API
---
- ``to_image_tensor(image, device)``: PIL image, numpy array, torch tensor or path -> `(3, H, W)` (0-255 scale).
- ``to_map_tensor(segmentation_map, device)``: the same kinds -> `(H, W)` integer ids (RGB panoptic PNGs decoded).
- ``as_list(items, name)`` / ``per_image(value, index, name)``: one item or a batch; the entry of one image.
- ``shortest_edge_size(height, width, shortest_edge, longest_edge)``: transformers' resize rule.
- ``resize_image(image, size, resample)`` (antialiased like PIL), ``resize_nearest(tensor, size)`` (ids kept).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import PILImageResampling

from .image_io import read_image, read_label_image

RESAMPLE_MODES = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


def as_list(items: Any, name: str) -> list[Any]:
    """One item, a list of them, or a 4-D batch array -> a non-empty list (``name`` is the argument, for errors)."""
    if isinstance(items, (list, tuple)):
        if len(items) == 0:
            raise ValueError(f"`{name}` is an empty list; pass at least one.")
        return list(items)
    if isinstance(items, (np.ndarray, torch.Tensor)) and items.ndim == 4:
        return list(items)
    return [items]


def per_image(value: Any, index: int, name: str, nested: bool = False) -> Any:
    """The entry of image ``index`` of a per-image argument, or the value itself when it is one for all images."""
    if value is None:
        return None
    if nested:
        # One list of segment dicts for all images, or a list of such lists.
        if len(value) > 0 and isinstance(value[0], dict):
            return value
    elif isinstance(value, dict):
        return value
    if index >= len(value):
        raise ValueError(f"`{name}` has {len(value)} entries; pass one per image.")
    return value[index]


def _pil_to_array(image: Any, keep_ids: bool) -> np.ndarray:
    if keep_ids:
        # Palette images hold class ids in the palette index; keep them.
        return np.asarray(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).astype(np.float32) / (257.0 if image.mode.startswith("I;16") else 1.0)
    if image.mode not in ("RGB", "L", "RGBA", "LA"):
        image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else "RGB")
    return np.asarray(image)


def to_image_tensor(image: Any, device: str | torch.device | None) -> torch.Tensor:
    """Any supported image -> `(3, H, W)` uint8 or float tensor (0-255 scale)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)  # EXIF orientation applied, 16-bit scaled, the file named in any error
    if isinstance(image, Image.Image):
        array = _pil_to_array(image, keep_ids=False)
        tensor = torch.from_numpy(np.array(array, copy=True))
        channels_last = tensor.ndim == 3
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        channels_last = None
    else:
        raise ValueError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array, torch tensor or path."
        )
    if tensor.dtype == torch.uint16 or (tensor.dtype == torch.int32 and tensor.max() > 255):
        tensor = tensor.float() / 257.0  # 16-bit -> 0-255 scale, so that rescale_factor 1/255 still applies
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"unsupported image dtype {tensor.dtype}; pass uint8, uint16 or float pixels.")
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if channels_last is None:
            # HWC when the last axis looks like channels, CHW when the first does.
            channels_last = tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4)
            if not channels_last and tensor.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"image of shape {tuple(tensor.shape)} has no channel axis of 1, 3 or 4; pass (H, W), (H, W, C) "
                    "or (C, H, W) with C in 1 (gray), 3 (RGB), 4 (RGBA)."
                )
        if channels_last:
            tensor = tensor.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    else:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}.")
    channels = tensor.shape[0]
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)  # gray -> RGB
    elif channels == 4:
        tensor = tensor[:3]  # drop alpha
    elif channels != 3:
        raise ValueError(f"an image must have 1, 3 or 4 channels, got {channels} (shape {tuple(tensor.shape)}).")
    if tensor.shape[-2] < 2 or tensor.shape[-1] < 2:
        raise ValueError(f"an image must be at least 2x2 pixels, got {tuple(tensor.shape[-2:])}.")
    if device is not None:
        tensor = tensor.to(device)
    return tensor.contiguous()


def to_map_tensor(segmentation_map: Any, device: str | torch.device | None) -> torch.Tensor:
    """A segmentation map -> `(H, W)` int64; RGB-encoded panoptic maps become R + 256 G + 256^2 B."""
    from PIL import Image

    if isinstance(segmentation_map, (str, os.PathLike)):
        segmentation_map = read_label_image(segmentation_map, what="segmentation map")
    if isinstance(segmentation_map, Image.Image):
        segmentation_map = np.array(segmentation_map, copy=True)
    if isinstance(segmentation_map, np.ndarray):
        if segmentation_map.dtype == np.uint16:
            segmentation_map = segmentation_map.astype(np.int64)
        tensor = torch.from_numpy(np.ascontiguousarray(segmentation_map))
    elif isinstance(segmentation_map, torch.Tensor):
        tensor = segmentation_map
    else:
        raise ValueError(
            f"unsupported segmentation map type {type(segmentation_map).__name__}; pass a PIL image, numpy array, "
            "torch tensor or path."
        )
    if tensor.is_floating_point():
        tensor = tensor.round()
    # int32 is enough for class, instance and COCO panoptic ids (< 256^3) and halves the memory traffic.
    tensor = tensor.long() if tensor.dtype == torch.int64 or tensor.is_floating_point() else tensor.int()
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    elif tensor.ndim == 3 and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    elif tensor.ndim == 3 and tensor.shape[-1] == 3:
        tensor = tensor[..., 0] + 256 * tensor[..., 1] + 256 * 256 * tensor[..., 2]  # COCO panoptic id encoding
    elif tensor.ndim == 3 and tensor.shape[0] == 3:
        tensor = tensor[0] + 256 * tensor[1] + 256 * 256 * tensor[2]  # the same, channels first
    elif tensor.ndim != 2:
        raise ValueError(
            f"a segmentation map must be (H, W) ids or an (H, W, 3) RGB panoptic PNG, got shape {tuple(tensor.shape)}."
        )
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def shortest_edge_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """`(height, width)` with the short side scaled to ``shortest_edge``, the long side at most ``longest_edge``."""
    # transformers' rule: scale the short side to `shortest_edge` unless the long side would pass `longest_edge`,
    # truncating the other side.
    short_side, long_side = float(min(height, width)), float(max(height, width))
    target = shortest_edge
    exact = None
    if long_side / short_side * shortest_edge > longest_edge:
        exact = longest_edge * short_side / long_side
        target = int(round(exact))
    if (height <= width and height == target) or (width <= height and width == target):
        return height, width
    base = exact if exact is not None else target
    if width < height:
        return int(base * height / width), target
    return target, int(base * width / height)


def resize_image(image: torch.Tensor, size: tuple[int, int], resample: Any) -> torch.Tensor:
    """`(C, H, W)` -> `(C, *size)` with ``resample`` (a `PILImageResampling`)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    mode = RESAMPLE_MODES.get(PILImageResampling(int(resample)), "bilinear")
    if mode == "nearest-exact":
        return resize_nearest(image, size)
    batch = image[None]  # (C, H, W) -> (1, C, H, W)
    # Antialiased like PIL; uint8 stays uint8 on the CPU (rounded like PIL), other dtypes resize in float.
    if batch.dtype != torch.uint8 or batch.device.type != "cpu":
        batch = batch.float()
    resized = F.interpolate(batch, size=size, mode=mode, antialias=True, align_corners=False)
    if mode == "bicubic" and resized.is_floating_point():
        resized = resized.clamp(0, 255)
    return resized[0]


def resize_nearest(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize by index (any dtype, ids kept exactly), sampling pixel centres like PIL's NEAREST."""
    height, width = tensor.shape[-2:]
    if (height, width) == tuple(size):
        return tensor
    rows = (
        ((torch.arange(size[0], dtype=torch.float64) + 0.5) * (height / size[0])).floor().long().clamp(max=height - 1)
    )
    cols = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * (width / size[1])).floor().long().clamp(max=width - 1)
    return tensor.index_select(-2, rows.to(tensor.device)).index_select(-1, cols.to(tensor.device))
