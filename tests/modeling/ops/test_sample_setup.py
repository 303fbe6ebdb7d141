"""The CPU kernels' vectorised sample setup against the shared header's one-sample form (what the CUDA kernels run).

The CPU setup (``csrc/cpu/sample_setup.h``: ``setup_samples``) computes the floor, the corner validity, the corner
rows and the bilinear weights of 8 (fp32) or 4 (fp64) samples per vector step with its own vector code; the CUDA
kernels compute them one sample at a time in the header's ``bilinear_sample``. This compiles a host program against
both and checks, bit for bit, that they agree on every sample: inside, partly inside, wholly outside, on exact
integer pixel coordinates, at the -1 / W borders, NaN and huge locations, for fp32, fp64 and bf16 inputs, with sample
counts that leave partial vectors. Skipped only where no C++ compiler is found (conftest.py builds the program).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

# Reads: L, then L lines "H W", then P, then Q (queries), then Q * L * P lines "x y" (sample order query, level,
# point). For each of fp32, fp64 and bf16 inputs prints one line: "<dtype> <samples> <inside> <mismatches>", where a
# mismatch is a sample whose inside flag, corner rows, corner weights or fractions differ (bitwise) between
# setup_samples and bilinear_sample, then one line per mismatch.
PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "cpu/sample_setup.h"
using namespace mask2former::msda;

template <typename T>
static bool same_bits(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

template <typename scalar_t, typename acc_t>
static void check(const char* name, const Problem& problem, const std::vector<double>& locations) {
  const int64_t count = static_cast<int64_t>(locations.size() / 2);
  std::vector<scalar_t> input(locations.size());
  for (size_t i = 0; i < locations.size(); ++i) input[i] = static_cast<scalar_t>(locations[i]);
  const int64_t zero_row = problem.num_values, row_stride = 3;  // a stride != 1 checks the premultiplied rows
  const LevelTable<acc_t> table(problem, problem.num_queries);
  SampleSetup<acc_t> setup(count);
  setup_samples<true, scalar_t, acc_t>(count, input.data(), static_cast<const scalar_t*>(nullptr), table, zero_row,
                                       row_stride, setup);
  int64_t inside_count = 0;
  std::vector<int64_t> bad;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t level = (i / problem.num_points) % problem.num_levels;
    const int64_t height = problem.spatial_shapes[2 * level], width = problem.spatial_shapes[2 * level + 1];
    BilinearSample<acc_t> sample;
    const bool inside = bilinear_sample<acc_t>(static_cast<acc_t>(input[2 * i]), static_cast<acc_t>(input[2 * i + 1]),
                                               height, width, sample);
    inside_count += inside;
    bool ok = (setup.inside[i] != 0) == inside;
    for (int c = 0; c < 4; ++c) {
      const bool valid = inside && sample.valid[c];
      const int64_t row = valid ? (problem.level_start[level] + sample.offset[c]) * row_stride : zero_row * row_stride;
      ok = ok && setup.row[c][i] == row && same_bits(setup.weight[c][i], valid ? sample.weight[c] : acc_t(0));
    }
    if (inside) ok = ok && same_bits(setup.frac_x[i], sample.frac_x) && same_bits(setup.frac_y[i], sample.frac_y);
    if (!ok) bad.push_back(i);
  }
  std::printf("%s %ld %ld %zu\n", name, static_cast<long>(count), static_cast<long>(inside_count), bad.size());
  for (int64_t i : bad) std::printf("mismatch %s sample %ld at (%.17g, %.17g)\n", name, static_cast<long>(i),
                                    locations[2 * i], locations[2 * i + 1]);
}

int main() {
  long num_levels, num_points, num_queries;
  if (std::scanf("%ld", &num_levels) != 1) return 1;
  std::vector<int64_t> shapes(2 * num_levels), level_start(num_levels);
  for (auto& size : shapes) std::scanf("%ld", &size);
  std::scanf("%ld %ld", &num_points, &num_queries);
  std::vector<double> locations(2 * num_queries * num_levels * num_points);
  for (auto& v : locations) std::scanf("%lf", &v);
  Problem problem{};
  problem.num_levels = num_levels;
  problem.num_points = num_points;
  problem.num_queries = num_queries;
  problem.spatial_shapes = shapes.data();
  problem.num_values = level_start_rows(shapes.data(), num_levels, level_start.data());
  problem.level_start = level_start.data();
  check<float, float>("float32", problem, locations);
  check<double, double>("float64", problem, locations);
  check<c10::BFloat16, float>("bfloat16", problem, locations);
  return 0;
}
"""


@pytest.fixture(scope="module")
def setup_program(host_programs) -> Path:
    # The extension's own flags (setup.py), so the check sees the code the kernels compile to.
    torch_includes = [f"-I{path}" for path in include_paths()]
    return host_programs.build("sample_setup_check", PROGRAM, ["-std=c++20", "-O3", *torch_includes])


def _locations(shapes: list[tuple[int, int]], num_points: int, num_queries: int) -> torch.Tensor:
    """(Q * L * P, 2) float64 locations, in the sample order (query, level, point), exact in bf16 where it matters."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for query in range(num_queries):
        for height, width in shapes:
            for point in range(num_points):
                kind = (query * num_points + point) % 5
                if kind == 0:  # random, some outside
                    rows.append((torch.rand(2, generator=generator, dtype=torch.float64) * 1.6 - 0.3).tolist())
                elif kind == 1:  # exact integer pixel coordinates, including the -1 and W - 1 borders
                    column = int(torch.randint(-1, width, (1,), generator=generator))
                    row = int(torch.randint(-1, height, (1,), generator=generator))
                    rows.append([(column + 0.5) / width, (row + 0.5) / height])
                elif kind == 2:  # just inside / outside the band -1 <= x < W
                    rows.append([-0.99 / width if point % 2 else (width - 0.01 + 0.5) / width, 0.5])
                elif kind == 3:  # far outside, huge
                    rows.append([1e30 if point % 2 else -7.0, 0.5 if point % 3 else 1e30])
                else:  # negative fractions: floor below truncation
                    rows.append([-0.25 / width, (height - 0.75) / height])
    return torch.tensor(rows, dtype=torch.float64)


def _run(host_programs, binary: Path, shapes, num_points: int, locations: torch.Tensor, num_queries: int) -> list[str]:
    lines = [str(len(shapes)), *(f"{height} {width}" for height, width in shapes), f"{num_points} {num_queries}"]
    lines += [" ".join(repr(float(value)) for value in pair) for pair in locations.tolist()]
    return host_programs.run(binary, lines)


@pytest.mark.parametrize("num_queries", [7, 16], ids=["partial-vectors", "whole-vectors"])
def test_vector_setup_matches_the_one_sample_form(host_programs, setup_program, num_queries):
    shapes, num_points = [(5, 7), (3, 4), (1, 2)], 3  # 9 samples per query: vectors straddle queries
    locations = _locations(shapes, num_points, num_queries)
    locations = torch.cat([locations, torch.tensor([[float("nan"), 0.5]] * (num_points * len(shapes)))])
    output = _run(host_programs, setup_program, shapes, num_points, locations, num_queries + 1)
    summaries = [line.split() for line in output if not line.startswith("mismatch")]
    assert [summary[0] for summary in summaries] == ["float32", "float64", "bfloat16"], output
    for name, samples, inside, mismatches in summaries:
        assert int(samples) == len(locations), output
        # Both sides of the inside test were exercised, and nothing differs.
        assert 0 < int(inside) < int(samples), output
        assert int(mismatches) == 0, "\n".join(line for line in output if name in line)
