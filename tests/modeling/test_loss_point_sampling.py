"""Point sampling: exact reads at pixel centres, importance sampling picks the uncertain points."""

import pytest
import torch

from mask2former.modeling.point_sampling import point_sample, sample_points_by_uncertainty


def test_point_sample_reads_pixel_values_at_pixel_centres():
    features = torch.randn(2, 3, 5, 7)
    rows = torch.tensor([0, 4, 2, 3])
    columns = torch.tensor([0, 6, 3, 1])
    # Pixel (r, c) covers [c/W, (c+1)/W) x [r/H, (r+1)/H); its centre is read exactly.
    coordinates = torch.stack([(columns + 0.5) / 7, (rows + 0.5) / 5], dim=-1)  # (4, 2) as (x, y)
    values = point_sample(features, coordinates.expand(2, -1, -1))  # (2, 3, 4)
    torch.testing.assert_close(values, features[:, :, rows, columns])
    # Halfway between two horizontal neighbours: their mean.
    between = torch.tensor([[[(1 + 0.5 + 0.5) / 7, 2.5 / 5]]]).expand(2, -1, -1)
    torch.testing.assert_close(point_sample(features, between)[..., 0], features[:, :, 2, 1:3].mean(-1))


def test_importance_sampling_keeps_the_most_uncertain_candidates():
    # Logits are confident (|logit| = 10) except in the columns 15..34 of 50, where they are 0: bilinear reads give
    # exactly 0 between those pixel centres (0.31 <= x <= 0.69), and ~38 % of the candidates land there, more than
    # the 75 % x 1/3 = 25 % that importance sampling keeps, so every kept point must lie in that band.
    mask_logits = torch.full((4, 50, 50), 10.0)
    mask_logits[1::2] *= -1
    mask_logits[:, :, 15:35] = 0
    num_points = 400
    points = sample_points_by_uncertainty(mask_logits, num_points, oversample_ratio=3, importance_sample_ratio=0.75)
    assert points.shape == (4, num_points, 2)
    assert points.min() >= 0 and points.max() <= 1
    uncertain, uniform = points[:, :300], points[:, 300:]
    x_uncertain = uncertain[..., 0]
    assert torch.all((x_uncertain >= 15.5 / 50) & (x_uncertain <= 34.5 / 50))
    # The remaining quarter is uniform: about 60 % of it falls outside the band.
    outside = ((uniform[..., 0] < 0.3) | (uniform[..., 0] > 0.7)).float().mean()
    assert outside > 0.45


def test_importance_sampling_argument_checks():
    logits = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match="oversample_ratio must be >= 1"):
        sample_points_by_uncertainty(logits, 16, oversample_ratio=0.5, importance_sample_ratio=0.75)
    with pytest.raises(ValueError, match="importance_sample_ratio must be in"):
        sample_points_by_uncertainty(logits, 16, oversample_ratio=3, importance_sample_ratio=1.5)
    assert sample_points_by_uncertainty(logits, 16, oversample_ratio=1, importance_sample_ratio=1.0).shape == (
        2,
        16,
        2,
    )
