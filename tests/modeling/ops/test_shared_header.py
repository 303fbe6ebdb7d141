"""The sampling math of the shared header, in the one-sample (scalar) form the CUDA kernels call, checked on the CPU.

The CPU kernels call the header's building blocks on vectors of samples; the CUDA kernels call them, through
``bilinear_sample`` and ``sample_gradient``, on one sample. This compiles a small host program against the header and
checks that scalar path against ``grid_sample`` and its autograd in float64, and that the scalar and the vector
instantiations of the building blocks agree bit for bit. Skipped only where no C++ compiler is found.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Reads: H W, then H*W map values (row-major), then N, then N lines "loc_x loc_y grad". Prints per point:
# sampled value, d_sample, d_loc_x, d_loc_y through bilinear_sample / sample_channel / sample_gradient (double), and
# whether the vector instantiations (4 doubles per vector) of corner_weights and bilinear_gradient gave identical bits.
PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "ms_deform_attn_common.h"
using namespace mask2former::msda;
typedef double double4 __attribute__((vector_size(32)));

int main() {
  long height, width;
  if (std::scanf("%ld %ld", &height, &width) != 2) return 1;
  std::vector<double> map(height * width);
  for (auto& v : map) std::scanf("%lf", &v);
  long count;
  std::scanf("%ld", &count);
  for (long i = 0; i < count; ++i) {
    double loc_x, loc_y, grad;
    std::scanf("%lf %lf %lf", &loc_x, &loc_y, &grad);
    BilinearSample<double> sample;
    double value = 0, d_sample = 0, d_loc_x = 0, d_loc_y = 0;
    int same_bits = 1;
    if (bilinear_sample<double>(loc_x, loc_y, height, width, sample)) {
      value = sample_channel<double>(map.data(), 1, sample);
      double corner_dot[4];
      for (int c = 0; c < 4; ++c) corner_dot[c] = sample.valid[c] ? grad * map[sample.offset[c]] : 0.0;
      sample_gradient<double>(sample, corner_dot, height, width, d_sample, d_loc_x, d_loc_y);
      // The same building blocks on vectors (lane 1 carries this sample, the others filler values).
      double4 fx = {0.25, sample.frac_x, 0.5, 0.75}, fy = {0.5, sample.frac_y, 0.25, 0.0};
      double4 vector_weight[4], vector_dot[4], vd_sample, vd_x, vd_y;
      corner_weights<double4, double>(fx, fy, vector_weight);
      double scalar_weight[4];
      corner_weights<double>(sample.frac_x, sample.frac_y, scalar_weight);
      for (int c = 0; c < 4; ++c) {
        same_bits &= std::memcmp(&scalar_weight[c], &vector_weight[c][1], sizeof(double)) == 0;
        vector_weight[c][1] = sample.weight[c];
        vector_dot[c] = double4{1.0, corner_dot[c], -2.0, 3.0};
      }
      bilinear_gradient<double4, double>(vector_weight, fx, fy, vector_dot, vd_sample, vd_x, vd_y);
      double sd_sample, sd_x, sd_y;
      bilinear_gradient<double>(sample.weight, sample.frac_x, sample.frac_y, corner_dot, sd_sample, sd_x, sd_y);
      same_bits &= std::memcmp(&sd_sample, &vd_sample[1], sizeof(double)) == 0;
      same_bits &= std::memcmp(&sd_x, &vd_x[1], sizeof(double)) == 0;
      same_bits &= std::memcmp(&sd_y, &vd_y[1], sizeof(double)) == 0;
      same_bits &= sd_sample == d_sample;
    }
    std::printf("%.17g %.17g %.17g %.17g %d\n", value, d_sample, d_loc_x, d_loc_y, same_bits);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def header_program(host_programs) -> Path:
    return host_programs.build("header_check", PROGRAM, ["-std=c++17", "-O2"])


def _run(host_programs, binary: Path, value_map: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    height, width = value_map.shape
    lines = [f"{height} {width}", " ".join(repr(v) for v in value_map.flatten().tolist()), str(len(points))]
    lines += [" ".join(repr(v) for v in point) for point in points.tolist()]
    # (N, 5): value, d_sample, d_loc_x, d_loc_y, same_bits
    output = host_programs.run(binary, lines)
    return torch.tensor([[float(field) for field in line.split()] for line in output], dtype=torch.float64)


def _grid_sample_oracle(value_map: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N, 4): value, d_sample, d_loc_x, d_loc_y of L = grad * sample through grid_sample's autograd (float64)."""
    locations = points[:, :2].clone().requires_grad_(True)
    # (1, 1, H, W) sampled at (1, 1, N, 2) grid in [-1, 1] -> (1, 1, 1, N) -> (N,)
    sampled = F.grid_sample(
        value_map[None, None], (2 * locations - 1)[None, None], mode="bilinear", padding_mode="zeros",
        align_corners=False,
    ).flatten()  # fmt: skip
    (grad_locations,) = torch.autograd.grad((sampled * points[:, 2]).sum(), locations)
    sampled = sampled.detach()
    return torch.stack([sampled, sampled * points[:, 2], grad_locations[:, 0], grad_locations[:, 1]], 1)


def test_scalar_sampling_math_matches_grid_sample(host_programs, header_program):
    generator = torch.Generator().manual_seed(0)
    height, width = 4, 8  # powers of two: the exact-integer points below are exact in binary
    value_map = torch.randn(height, width, generator=generator, dtype=torch.float64)
    random_points = torch.rand(200, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2  # some outside
    # Exact integer pixel coordinates (grid_sample's floor convention for the gradient), the border band
    # -1 <= x < 0 and the last column/row.
    integer_points = torch.tensor(
        [[(column + 0.5) / width, (row + 0.5) / height] for column in range(width) for row in range(height)]
    )
    border_points = torch.tensor(
        [[-0.5 / width, 0.5], [-0.99 / width, 0.3], [1.0, 0.5], [(width - 0.01) / width, 0.7], [0.4, -0.9 / height],
         [0.6, 1.0 - 0.01 / height], [-1.01 / width, 0.5], [0.5, 1.0 + 0.51 / height]],
        dtype=torch.float64,
    )  # fmt: skip
    locations = torch.cat([random_points, integer_points.double(), border_points])
    grads = torch.randn(len(locations), 1, generator=generator, dtype=torch.float64)
    points = torch.cat([locations, grads], 1)

    ours = _run(host_programs, header_program, value_map, points)
    oracle = _grid_sample_oracle(value_map, points)
    torch.testing.assert_close(ours[:, :4], oracle, rtol=0, atol=1e-12)
    assert bool((ours[:, 4] == 1).all()), "scalar and vector instantiations of the header disagree"
    # The sample exercised both sides of every test: inside, partly inside, wholly outside.
    assert (ours[:, 0] == 0).any() and (ours[:, 0] != 0).any()


def test_nan_location_samples_zero(host_programs, header_program):
    value_map = torch.ones(3, 5, dtype=torch.float64)
    points = torch.tensor([[float("nan"), 0.5, 1.0], [0.5, float("nan"), 1.0]], dtype=torch.float64)
    ours = _run(host_programs, header_program, value_map, points)
    assert torch.equal(ours[:, :4], torch.zeros(2, 4, dtype=torch.float64))
