// Sampling math of multi-scale deformable attention, shared by the CPU and the CUDA kernels.
//
// Everything here is `__host__ __device__` (when compiled by nvcc) and free of torch types, so the CPU tests
// exercise exactly the arithmetic the GPU runs. Conventions are those of
// `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`:
//   a location (x, y) normalised to [0, 1] lands on pixel coordinates (x * W - 0.5, y * H - 0.5);
//   the four neighbours are floor() and floor() + 1 in each direction (so an exact integer coordinate puts its
//   full weight on that pixel, and its gradient uses the pixel to the right/below);
//   neighbours outside the map contribute zero.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__
#define MSDA_INLINE __forceinline__
#define MSDA_UNROLL _Pragma("unroll")
#else
#define MSDA_HOST_DEVICE
#if defined(__GNUC__) || defined(__clang__)
// Forced, so the CPU kernels' per-ISA clones inline (and vectorise) the sampling math instead of calling a
// baseline out-of-line copy.
#define MSDA_INLINE inline __attribute__((always_inline))
#else
#define MSDA_INLINE inline
#endif
#if defined(__clang__)
#define MSDA_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MSDA_UNROLL _Pragma("GCC unroll 4")
#else
#define MSDA_UNROLL
#endif
#endif

namespace mask2former {
namespace msda {

template <typename acc_t>
MSDA_HOST_DEVICE MSDA_INLINE acc_t floor_value(acc_t v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return floor(v);  // the device overloads for float and double
#else
  return std::floor(v);
#endif
}

// The four bilinear neighbours of one sampling location on one level.
// Corner order: 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
template <typename acc_t>
struct BilinearSample {
  int64_t offset[4];  // row index of each corner inside the level (y * W + x); meaningful where valid[c]
  acc_t weight[4];    // bilinear weight of each corner, 0 where the corner is outside the map
  bool valid[4];      // corner inside the map
  acc_t frac_x;       // x - floor(x), in [0, 1)
  acc_t frac_y;       // y - floor(y)
};

// Fills `sample` for the normalised location (loc_x, loc_y) on a height x width map.
// Returns false when no corner lies inside the map (the sample and its gradient are then exactly zero);
// NaN locations also return false.
template <typename acc_t>
MSDA_HOST_DEVICE MSDA_INLINE bool bilinear_sample(
    acc_t loc_x, acc_t loc_y, int64_t height, int64_t width, BilinearSample<acc_t>& sample) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // A corner is inside for -1 <= x < width: at x == -1 the right neighbour (column 0) has weight 0 but still
  // carries a location gradient, as in grid_sample. The negated form also rejects NaN.
  if (!(x >= static_cast<acc_t>(-1) && x < static_cast<acc_t>(width) && y >= static_cast<acc_t>(-1) &&
        y < static_cast<acc_t>(height))) {
    return false;
  }
  const acc_t x_floor = floor_value(x);
  const acc_t y_floor = floor_value(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const acc_t fx = x - x_floor;
  const acc_t fy = y - y_floor;
  sample.frac_x = fx;
  sample.frac_y = fy;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < height;
  sample.valid[0] = y0_in && x0_in;
  sample.valid[1] = y0_in && x1_in;
  sample.valid[2] = y1_in && x0_in;
  sample.valid[3] = y1_in && x1_in;
  const acc_t one = static_cast<acc_t>(1);
  sample.weight[0] = sample.valid[0] ? (one - fy) * (one - fx) : acc_t(0);
  sample.weight[1] = sample.valid[1] ? (one - fy) * fx : acc_t(0);
  sample.weight[2] = sample.valid[2] ? fy * (one - fx) : acc_t(0);
  sample.weight[3] = sample.valid[3] ? fy * fx : acc_t(0);
  sample.offset[0] = y0 * width + x0;
  sample.offset[1] = sample.offset[0] + 1;
  sample.offset[2] = sample.offset[0] + width;
  sample.offset[3] = sample.offset[2] + 1;
  return true;
}

// The common case in one test: all four corners inside the map. Fills the top-left corner's row index and the four
// weights (same corner order and arithmetic as bilinear_sample, so both give identical results) and returns true;
// returns false (leaving the outputs unspecified) when bilinear_sample must handle the point.
template <typename acc_t>
MSDA_HOST_DEVICE MSDA_INLINE bool bilinear_sample_interior(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                                                           int64_t& top_left, acc_t weight[4]) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  if (!(x >= acc_t(0) && y >= acc_t(0) && x < static_cast<acc_t>(width - 1) && y < static_cast<acc_t>(height - 1))) {
    return false;
  }
  // Non-negative: truncation is floor.
  const int64_t x0 = static_cast<int64_t>(x);
  const int64_t y0 = static_cast<int64_t>(y);
  const acc_t fx = x - static_cast<acc_t>(x0);
  const acc_t fy = y - static_cast<acc_t>(y0);
  const acc_t one = static_cast<acc_t>(1);
  weight[0] = (one - fy) * (one - fx);
  weight[1] = (one - fy) * fx;
  weight[2] = fy * (one - fx);
  weight[3] = fy * fx;
  top_left = y0 * width + x0;
  return true;
}

// Bilinear value of one channel: `level_value` points at row 0 of the level for this (batch, head, channel),
// consecutive rows are `row_stride` elements apart. Corners outside the map read nothing.
template <typename acc_t, typename scalar_t>
MSDA_HOST_DEVICE MSDA_INLINE acc_t sample_channel(
    const scalar_t* level_value, int64_t row_stride, const BilinearSample<acc_t>& sample) {
  acc_t result = 0;
MSDA_UNROLL
  for (int corner = 0; corner < 4; ++corner) {
    if (sample.valid[corner]) {
      result += sample.weight[corner] * static_cast<acc_t>(level_value[sample.offset[corner] * row_stride]);
    }
  }
  return result;
}

// Gradient of one sample. `corner_dot[c]` is <dL/d(sampled value), value at corner c> summed over channels
// (0 for a corner outside the map). Returns, through the out-parameters,
//   d_sample = dL/d(sampled value · 1) = sum_c weight[c] * corner_dot[c]   (the attention-weight gradient),
//   d_loc_x, d_loc_y = dL/d(normalised location) for an attention weight of 1.
template <typename acc_t>
MSDA_HOST_DEVICE MSDA_INLINE void sample_gradient(
    const BilinearSample<acc_t>& sample, const acc_t corner_dot[4], int64_t height, int64_t width,
    acc_t& d_sample, acc_t& d_loc_x, acc_t& d_loc_y) {
  const acc_t one = static_cast<acc_t>(1);
  const acc_t fx = sample.frac_x;
  const acc_t fy = sample.frac_y;
  d_sample = sample.weight[0] * corner_dot[0] + sample.weight[1] * corner_dot[1] + sample.weight[2] * corner_dot[2] +
             sample.weight[3] * corner_dot[3];
  // d(weights)/dx in pixel units, then the chain rule through x = loc_x * W - 0.5.
  const acc_t d_x = (one - fy) * (corner_dot[1] - corner_dot[0]) + fy * (corner_dot[3] - corner_dot[2]);
  const acc_t d_y = (one - fx) * (corner_dot[2] - corner_dot[0]) + fx * (corner_dot[3] - corner_dot[1]);
  d_loc_x = d_x * static_cast<acc_t>(width);
  d_loc_y = d_y * static_cast<acc_t>(height);
}

// Start row of every level in the flattened value (prefix sums of H_l * W_l); returns the total row count.
MSDA_HOST_DEVICE MSDA_INLINE int64_t level_start_rows(const int64_t* spatial_shapes, int64_t num_levels,
                                                      int64_t* level_start) {
  int64_t start = 0;
  for (int64_t level = 0; level < num_levels; ++level) {
    level_start[level] = start;
    start += spatial_shapes[2 * level] * spatial_shapes[2 * level + 1];
  }
  return start;
}

}  // namespace msda
}  // namespace mask2former
