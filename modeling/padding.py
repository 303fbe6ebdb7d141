"""Padding: each image's valid region, read once at the model's entry and carried to every stage, and the engine that
runs the pixel-level stages per valid region.

    pixel_mask (B, H, W) -> valid_regions(): ValidRegions (valid (height, width) per image, one host read)
                         -> ValidRegions.on_grid(h, w): (B, h, w) valid cells of any feature grid
                         -> run_per_valid_region(stage, maps, regions): the stage on each image's valid region

Why the pixel-level module runs per valid region: masking values, valid ratios and masked attention keep padding out
of the *attention* layers, but the backbone's convolutions, normalisation statistics and Swin windows, the pixel
decoder's GroupNorm statistics, its 3x3 convolutions and its bilinear upsampling all read across the border of the
valid region. The only exact cure is to not show the padding: each image runs on its valid region rounded up to the
size divisor (32), i.e. exactly the input the image processor gives that image alone, and the resulting maps are
zero-padded back to the batch size. Images of the same rounded size share one call, so the common training batch
(all images one size) is a single call without any cropping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

SIZE_DIVISOR = 32  # the backbone's coarsest stride: model inputs are multiples of it, and so are the groups' sizes

StageOutput = TypeVar("StageOutput")


def valid_sizes(pixel_mask: torch.Tensor) -> torch.Tensor:
    """`(B, H, W)` mask (padding at the bottom/right) -> `(B, 2)` long ``(valid_height, valid_width)``."""
    mask = pixel_mask.bool()
    return torch.stack([mask.any(2).sum(1), mask.any(1).sum(1)], -1)


@dataclass
class SizeGroup:
    """Images of a batch that share one valid size rounded up to the size divisor: they run as one crop."""

    indices: list[int]
    height: int
    width: int


@dataclass
class ValidRegions:
    """Where the real pixels of a padded batch lie: image ``b`` fills the top-left ``sizes[b]`` of ``input_size``.

    Args:
        sizes (`torch.Tensor` of shape `(B, 2)`): ``(valid_height, valid_width)`` per image, on the batch's device.
        input_size (`tuple[int, int]`): ``(H, W)`` of the padded input.
        groups (`list[SizeGroup]`, *optional*): the images by rounded-up valid size; None runs the batch as one call
            (the padding then stays out of the attention layers only).
    """

    sizes: torch.Tensor
    input_size: tuple[int, int]
    groups: list[SizeGroup] | None = None

    def on_grid(self, height: int, width: int) -> torch.Tensor:
        """The valid cells of a `(height, width)` feature grid of the input -> `(B, height, width)` bool.

        A cell is valid when its receptive cell holds at least one real pixel: with stride ``s = H / height`` the
        first ``ceil(valid_height / s)`` rows are valid (and likewise for columns). Computed from the valid extent
        only, so an image gets the same cells alone and padded in a batch.
        """
        full_height, full_width = self.input_size
        # ceil(valid * height / full) in integers
        valid_rows = (self.sizes[:, 0] * height + full_height - 1) // full_height
        valid_cols = (self.sizes[:, 1] * width + full_width - 1) // full_width
        rows = torch.arange(height, device=self.sizes.device)
        cols = torch.arange(width, device=self.sizes.device)
        # (B, height, 1) & (B, 1, width) -> (B, height, width)
        return (rows[None, :, None] < valid_rows[:, None, None]) & (cols[None, None, :] < valid_cols[:, None, None])

    def crop(self, indices: torch.Tensor, height: int, width: int) -> ValidRegions:
        """The regions of images ``indices`` on the input cropped to its top-left `(height, width)`, as one call."""
        return ValidRegions(self.sizes[indices], (height, width))


def valid_regions(pixel_mask: torch.Tensor | None, size_divisor: int = SIZE_DIVISOR) -> ValidRegions | None:
    """The valid regions of a `(B, H, W)` pixel mask (1 = real pixel), or None when it marks no padding.

    None (no mask, or all ones) selects the unpadded path: one batched pass. Otherwise the mask is read on the host
    once, to group the images by valid size rounded up to ``size_divisor``.

    Under ``torch.export``, which cannot read data, the regions come without groups: the batch runs as one call with
    the masks applied. That is exact when every image's valid size rounds up to the input size (an all-ones mask,
    one image, images of one size); the exported program checks it at run time and raises otherwise, rather than
    let another image's padding reach an image's convolutions.

    Raises:
        ValueError: an image has no valid pixel.
    """
    if pixel_mask is None:
        return None
    sizes = valid_sizes(pixel_mask)
    input_size = (pixel_mask.shape[-2], pixel_mask.shape[-1])
    if torch.compiler.is_exporting():
        rounded = (sizes + size_divisor - 1) // size_divisor * size_divisor  # (B, 2)
        one_group = (rounded[:, 0] == input_size[0]) & (rounded[:, 1] == input_size[1])
        torch._assert_async(
            one_group.all(),
            "pixel_mask: this exported program runs a batch as one call, which is exact only when every image's "
            f"valid size rounded up to {size_divisor} is the input size; run batches of images of different sizes "
            "through the eager model, or one image at a time",
        )
        return ValidRegions(sizes, input_size)
    host_sizes = [tuple(size) for size in sizes.tolist()]
    if all(size == input_size for size in host_sizes):
        return None
    return ValidRegions(sizes, input_size, group_by_padded_size(host_sizes, size_divisor))


def group_by_padded_size(sizes: list[tuple[int, int]], size_divisor: int = SIZE_DIVISOR) -> list[SizeGroup]:
    """Groups images by their valid ``(height, width)`` rounded up to ``size_divisor`` (in order of appearance)."""
    groups: dict[tuple[int, int], SizeGroup] = {}
    for index, (valid_height, valid_width) in enumerate(sizes):
        if valid_height == 0 or valid_width == 0:
            raise ValueError(f"pixel_mask[{index}] has no valid pixel; every image needs at least one.")
        height = -(-valid_height // size_divisor) * size_divisor
        width = -(-valid_width // size_divisor) * size_divisor
        groups.setdefault((height, width), SizeGroup([], height, width)).indices.append(index)
    return list(groups.values())


def run_per_valid_region(
    stage: Callable[[list[torch.Tensor], ValidRegions | None], StageOutput],
    inputs: list[torch.Tensor],
    regions: ValidRegions | None,
) -> StageOutput:
    """Runs a pixel-level stage on each group's valid region and assembles its outputs into zero-padded batch maps.

    Args:
        stage: ``stage(maps, regions)``: batch maps `(B, C, H/s, W/s)` (any strides ``s``) and their valid regions ->
            maps `(B, ..., H/s, W/s)`, or a list, tuple or dataclass (a `ModelOutput`) of them and None.
        inputs: the stage's input maps for the whole batch, `(B, C, H/s, W/s)`.
        regions: from `valid_regions`; None (no padding), no groups, or one group filling the input run the batch
            as one call.

    Returns:
        what ``stage`` returns, for the whole batch; each map is zero (False) where an image's crop does not reach.
    """
    if regions is None or regions.groups is None:
        return stage(inputs, regions)
    height, width = regions.input_size
    groups = regions.groups
    if len(groups) == 1 and (groups[0].height, groups[0].width) == (height, width):
        return stage(inputs, regions)
    outputs = []
    for group in groups:
        index = torch.tensor(group.indices, device=regions.sizes.device)
        crops = []
        for x in inputs:
            stride = height // x.shape[-2]
            # (B, C, H/s, W/s) -> (B_g, C, h_g/s, w_g/s)
            crops.append(x[index, ..., : group.height // stride, : group.width // stride])
        outputs.append(stage(crops, regions.crop(index, group.height, group.width)))
    return _assemble(outputs, groups, len(regions.sizes), height, width)


def _assemble(per_group: list[Any], groups: list[SizeGroup], batch_size: int, height: int, width: int) -> Any:
    """Per-group stage outputs (the same structure for every group) -> one batch output of zero-padded maps."""
    first = per_group[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        stride = groups[0].height // first.shape[-2]
        full = first.new_zeros(batch_size, *first.shape[1:-2], height // stride, width // stride)
        for group, crop in zip(groups, per_group):
            index = torch.tensor(group.indices, device=full.device)
            # (B, ..., H/s, W/s)[indices, ..., :h, :w] = (B_g, ..., h, w)
            full[index, ..., : crop.shape[-2], : crop.shape[-1]] = crop
        return full
    if isinstance(first, (list, tuple)):
        return type(first)(
            _assemble([output[entry] for output in per_group], groups, batch_size, height, width)
            for entry in range(len(first))
        )
    if dataclasses.is_dataclass(first):
        return type(first)(
            **{
                field.name: _assemble(
                    [getattr(output, field.name) for output in per_group], groups, batch_size, height, width
                )
                for field in dataclasses.fields(first)
            }
        )
    raise TypeError(f"a pixel-level stage returned a {type(first).__name__}; return maps, or containers of maps.")
