"""The padding engine: valid regions read once from pixel_mask, their feature-grid masks, the size groups, and the
per-region run of a stage with its outputs assembled into zero-padded batch maps."""

from dataclasses import dataclass

import pytest
import torch

from mask2former.modeling import padding
from mask2former.modeling.padding import ValidRegions, group_by_padded_size, run_per_valid_region, valid_regions


def _pixel_mask(sizes: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for index, (valid_height, valid_width) in enumerate(sizes):
        mask[index, :valid_height, :valid_width] = 1
    return mask


def test_valid_sizes_count_the_rows_and_columns_of_real_pixels():
    mask = _pixel_mask([(50, 70), (64, 96), (1, 3)], 64, 96)
    assert padding.valid_sizes(mask).tolist() == [[50, 70], [64, 96], [1, 3]]


def test_valid_cells_on_feature_grids():
    regions = ValidRegions(torch.tensor([[50, 70], [64, 96]]), (64, 96))
    # stride 8: ceil(50 / 8) = 7 rows, ceil(70 / 8) = 9 columns hold real pixels
    expected = torch.zeros(2, 8, 12, dtype=torch.bool)
    expected[0, :7, :9] = True
    expected[1] = True
    assert torch.equal(regions.on_grid(8, 12), expected)
    # stride 32: ceil(50 / 32) = 2 rows, ceil(70 / 32) = 3 columns: the whole grid
    assert regions.on_grid(2, 3).all()
    # the same cells for the image alone on its own padded size
    alone = ValidRegions(torch.tensor([[50, 70]]), (64, 96)).crop(torch.tensor([0]), 64, 96)
    assert torch.equal(alone.on_grid(8, 12)[0], expected[0])


def test_no_regions_without_padding():
    assert valid_regions(None) is None
    assert valid_regions(torch.ones(2, 64, 96)) is None


def test_regions_group_images_by_rounded_up_valid_size():
    mask = _pixel_mask([(40, 96), (64, 96), (64, 60), (33, 65)], 64, 96)
    regions = valid_regions(mask)
    assert regions.input_size == (64, 96)
    assert regions.sizes.tolist() == [[40, 96], [64, 96], [64, 60], [33, 65]]
    # 40x96, 64x96 and 33x65 round up to 64x96; 64x60 to 64x64
    assert [(group.indices, group.height, group.width) for group in regions.groups] == [
        ([0, 1, 3], 64, 96),
        ([2], 64, 64),
    ]


def test_group_by_padded_size_keeps_the_order_of_appearance():
    groups = group_by_padded_size([(10, 10), (40, 40), (31, 32), (33, 33)], size_divisor=32)
    assert [(group.indices, group.height, group.width) for group in groups] == [
        ([0, 2], 32, 32),
        ([1, 3], 64, 64),
    ]


def test_an_image_without_valid_pixels_is_refused():
    with pytest.raises(ValueError, match=r"pixel_mask\[1\] has no valid pixel"):
        valid_regions(_pixel_mask([(64, 64), (0, 0)], 64, 64))


def test_under_export_the_regions_have_no_groups(monkeypatch):
    """torch.export cannot read the mask on the host: the batch then runs as one call, masked."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    regions = valid_regions(torch.ones(2, 64, 96))
    assert regions is not None and regions.groups is None and regions.sizes.tolist() == [[64, 96], [64, 96]]


@dataclass
class _Maps:
    feature: torch.Tensor
    pyramid: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...] | None
    nothing: torch.Tensor | None = None


def _stage(calls):
    """A stage whose maps are the input pooled to strides 2 and 4 (+1), and its valid masks at stride 4."""

    def stage(inputs, regions):
        (image,) = inputs
        calls.append((tuple(image.shape), None if regions is None else regions.sizes.tolist()))
        pooled = torch.nn.functional.avg_pool2d(image, 2) + 1
        coarse = torch.nn.functional.avg_pool2d(image, 4) + 1
        masks = None if regions is None else (regions.on_grid(*coarse.shape[-2:]),)
        return _Maps(pooled, (coarse, coarse * 2), masks)

    return stage


def test_run_per_valid_region_runs_each_group_on_its_crop_and_pads_the_maps_back():
    pixel_mask = _pixel_mask([(64, 96), (20, 30), (64, 90)], 64, 96)
    image = torch.randn(3, 1, 64, 96)
    regions = valid_regions(pixel_mask)
    calls = []
    out = run_per_valid_region(_stage(calls), [image], regions)
    # two groups: images 0 and 2 at 64x96, image 1 alone at 32x32
    assert calls == [((2, 1, 64, 96), [[64, 96], [64, 90]]), ((1, 1, 32, 32), [[20, 30]])]
    assert out.feature.shape == (3, 1, 32, 48) and out.nothing is None
    alone = []
    alone_out = run_per_valid_region(
        _stage(alone), [image[1:2, :, :32, :32]], valid_regions(pixel_mask[1:2, :32, :32])
    )
    torch.testing.assert_close(out.feature[1, :, :16, :16], alone_out.feature[0])
    assert (out.feature[1, :, 16:] == 0).all() and (out.feature[1, :, :, 16:] == 0).all()  # zero outside its crop
    torch.testing.assert_close(out.pyramid[1][1, :, :8, :8], alone_out.pyramid[1][0])
    torch.testing.assert_close(out.feature[[0, 2]], torch.nn.functional.avg_pool2d(image[[0, 2]], 2) + 1)
    # the valid masks are assembled too: False outside each crop, as if computed for the whole batch
    assert torch.equal(out.masks[0], regions.on_grid(16, 24))


def test_run_per_valid_region_is_one_call_without_padding_or_groups():
    image = torch.randn(2, 1, 64, 64)
    for regions in (None, ValidRegions(torch.tensor([[64, 64], [40, 40]]), (64, 64))):  # no mask; export
        calls = []
        run_per_valid_region(_stage(calls), [image], regions)
        assert [shape for shape, _ in calls] == [(2, 1, 64, 64)]
    # one group that fills the input: one call on the batch, with its masks
    calls = []
    run_per_valid_region(_stage(calls), [image], valid_regions(_pixel_mask([(64, 64), (40, 40)], 64, 64)))
    assert calls == [((2, 1, 64, 64), [[64, 64], [40, 40]])]
