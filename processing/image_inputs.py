"""Processor inputs: images and segmentation maps in any supported form -> tensors, and their resizing.

API
---
- ``to_image_tensor(image, device, num_channels, input_data_format)``: PIL image, numpy array, torch tensor or path
  -> `(C, H, W)` on the 0-255 scale (16-bit scaled), channels as transformers infers them or as given.
- ``to_map_tensor(segmentation_map, device)``: the same kinds -> `(H, W)` integer ids (RGB panoptic PNGs decoded).
- ``as_list(items, name)`` / ``per_image(value, index, name)``: one item or a batch; the entry of one image.
- ``shortest_edge_size(height, width, shortest_edge, longest_edge)``: transformers' resize rule.
- ``resize_image(image, size, resample)`` (antialiased like PIL), ``resize_nearest(tensor, size)`` (ids kept).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import ChannelDimension, PILImageResampling

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


def _pil_to_array(image: Any) -> tuple[np.ndarray, bool]:
    """A PIL image -> `(H, W)` or `(H, W, C)` array with the mode's bands, and whether the last band is alpha."""
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), False  # native byte order
    if image.mode in ("I", "F", "L", "LA", "RGB", "RGBA"):
        return np.asarray(image), image.mode in ("LA", "RGBA")
    with_alpha = "A" in image.mode or "a" in image.mode or (image.mode == "P" and "transparency" in image.info)
    return np.asarray(image.convert("RGBA" if with_alpha else "RGB")), with_alpha


def channel_layout(value: str | ChannelDimension, name: str) -> ChannelDimension:
    """`value` ("channels_first" / "channels_last" or the enum) as a `ChannelDimension` (`name` for the error)."""
    try:
        layout = ChannelDimension(value)
    except ValueError:
        layout = None
    if layout not in (ChannelDimension.FIRST, ChannelDimension.LAST):
        raise ValueError(f"{name} must be 'channels_first' or 'channels_last', got {value!r}.")
    return layout


def _channel_axis(shape: tuple[int, ...], input_data_format: Any, num_channels: int) -> int:
    """0 or 2: where the channels of a 3-D array are, given or inferred as transformers infers them."""
    if input_data_format is not None:
        return 0 if channel_layout(input_data_format, "input_data_format") == ChannelDimension.FIRST else 2
    counts = sorted({1, 3, 4, num_channels})
    first, last = shape[0] in counts, shape[2] in counts
    if first and last:
        warnings.warn(
            f"the channel axis of an image of shape {shape} is ambiguous; reading it as (C, H, W), as transformers "
            "does. Pass input_data_format='channels_last' if it is (H, W, C).",
            stacklevel=4,
        )
    if first or last:
        return 0 if first else 2
    raise ValueError(
        f"cannot tell the channel axis of an image of shape {shape}: neither its first nor its last axis has "
        f"{counts} entries. Pass input_data_format ('channels_first' or 'channels_last')."
    )


def _to_8bit_scale(tensor: torch.Tensor) -> torch.Tensor:
    """Pixels on the 0-255 scale that `rescale_factor` (1/255) expects: 16-bit images (uint16, or integer / float
    values above 255) are scaled by 255/65535."""
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"unsupported image dtype {tensor.dtype}; pass uint8, uint16 or float pixels.")
    tensor = tensor.float()
    peak = float(tensor.amax()) if tensor.numel() else 0.0
    if peak > 65535:
        raise ValueError(
            f"pixel values go up to {peak:g}, more than 16 bits; pass 8-bit (0-255) or 16-bit (0-65535) pixels."
        )
    return tensor / 257.0 if peak > 255 else tensor


def _match_channels(tensor: torch.Tensor, num_channels: int, has_alpha: bool) -> torch.Tensor:
    """`(C, H, W)` -> `(num_channels, H, W)`: kept when they agree; gray -> RGB and RGBA (or gray + alpha) -> RGB
    when 3 are wanted."""
    channels = tensor.shape[0]
    if channels == num_channels:
        return tensor
    if num_channels == 3 and channels in (1, 2, 4) and (channels != 2 or has_alpha):
        return tensor[: 3 if channels == 4 else 1].expand(3, -1, -1)  # alpha dropped, gray repeated
    raise ValueError(
        f"an image of shape {tuple(tensor.shape)} (channels first) has {channels} channels but image_mean and "
        f"image_std have {num_channels} values; pass {num_channels}-channel images, or an image_mean and image_std "
        f"of {channels} values."
    )


def to_image_tensor(
    image: Any,
    device: str | torch.device | None,
    num_channels: int = 3,
    input_data_format: str | ChannelDimension | None = None,
) -> torch.Tensor:
    """Any supported image -> `(num_channels, H, W)` uint8 or float tensor on the 0-255 scale.

    Channels: a PIL image has its mode's bands; for a 3-D array or tensor `input_data_format` says where they are,
    otherwise they are inferred as transformers does (the axis of 1, 3, 4 or `num_channels` entries, the first when
    both are). They are kept when there are `num_channels` of them (the length of `image_mean`/`image_std`); with 3
    wanted, gray becomes RGB and the alpha of RGBA (or gray + alpha) is dropped; anything else is an error naming the
    shapes. Bit depth: 16-bit pixels (uint16, PIL "I;16"/"I", integer or float values above 255) are scaled to 0-255.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)  # EXIF orientation applied, 16-bit scaled, the file named in any error
    has_alpha = False
    if isinstance(image, Image.Image):
        array, has_alpha = _pil_to_array(image)
        tensor = torch.from_numpy(np.array(array, copy=True))
        input_data_format = ChannelDimension.LAST
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    else:
        raise ValueError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array, torch tensor or path."
        )
    tensor = _to_8bit_scale(tensor)
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if _channel_axis(tuple(tensor.shape), input_data_format, num_channels) == 2:
            tensor = tensor.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    else:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}.")
    tensor = _match_channels(tensor, num_channels, has_alpha)
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
