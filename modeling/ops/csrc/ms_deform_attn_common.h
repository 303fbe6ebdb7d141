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

// The building blocks below are templates over `T`, one value or a vector of values (GCC/Clang vector extensions,
// which give vectors the arithmetic and comparison operators of their element type `E`): the CUDA kernels call them
// per sample, the CPU kernels on 8 (fp32) or 4 (fp64) samples at once, so both run the same arithmetic.

// Pixel coordinate of a location normalised to [0, 1] over a map of `size` pixels (align_corners=False).
template <typename T, typename E = T>
MSDA_HOST_DEVICE MSDA_INLINE T pixel_coordinate(T location, T size) {
  return location * size - static_cast<E>(0.5);
}

// Whether some bilinear neighbour of pixel coordinate (x, y) lies inside a width x height map: -1 <= x < width and
// -1 <= y < height. At x == -1 the right neighbour (column 0) has weight 0 but still carries a location gradient,
// as in grid_sample. False for NaN. For vectors: a lane mask (all bits set where true).
template <typename T, typename E = T>
MSDA_HOST_DEVICE MSDA_INLINE auto location_inside(T x, T y, T width, T height) {
  return (x >= static_cast<E>(-1)) & (x < width) & (y >= static_cast<E>(-1)) & (y < height);
}

// Bilinear weights of the four corners from the fractional parts of the pixel coordinate.
// Corner order: 0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1, x0 + 1).
template <typename T, typename E = T>
MSDA_HOST_DEVICE MSDA_INLINE void corner_weights(T frac_x, T frac_y, T weight[4]) {
  const E one = static_cast<E>(1);
  weight[0] = (one - frac_y) * (one - frac_x);
  weight[1] = (one - frac_y) * frac_x;
  weight[2] = frac_y * (one - frac_x);
  weight[3] = frac_y * frac_x;
}

// Gradient of one bilinear sample from `corner_dot[c]` = <dL/d(sampled value), value at corner c> summed over
// channels (0 for a corner outside the map) and `weight` = its corner weights (0 outside):
//   d_sample = sum_c weight[c] * corner_dot[c]  (dL/d(attention weight), for an attention weight of 1),
//   d_x, d_y = dL/d(pixel coordinate) for an attention weight of 1 (times W, H: dL/d(normalised location)).
template <typename T, typename E = T>
MSDA_HOST_DEVICE MSDA_INLINE void bilinear_gradient(const T weight[4], T frac_x, T frac_y, const T corner_dot[4],
                                                    T& d_sample, T& d_x, T& d_y) {
  const E one = static_cast<E>(1);
  d_sample = weight[0] * corner_dot[0] + weight[1] * corner_dot[1] + weight[2] * corner_dot[2] +
             weight[3] * corner_dot[3];
  d_x = (one - frac_y) * (corner_dot[1] - corner_dot[0]) + frac_y * (corner_dot[3] - corner_dot[2]);
  d_y = (one - frac_x) * (corner_dot[2] - corner_dot[0]) + frac_x * (corner_dot[3] - corner_dot[1]);
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
  const acc_t width_f = static_cast<acc_t>(width);
  const acc_t height_f = static_cast<acc_t>(height);
  const acc_t x = pixel_coordinate<acc_t>(loc_x, width_f);
  const acc_t y = pixel_coordinate<acc_t>(loc_y, height_f);
  if (!location_inside<acc_t>(x, y, width_f, height_f)) return false;
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
  corner_weights<acc_t>(fx, fy, sample.weight);
  MSDA_UNROLL
  for (int corner = 0; corner < 4; ++corner) {
    if (!sample.valid[corner]) sample.weight[corner] = acc_t(0);
  }
  sample.offset[0] = y0 * width + x0;
  sample.offset[1] = sample.offset[0] + 1;
  sample.offset[2] = sample.offset[0] + width;
  sample.offset[3] = sample.offset[2] + 1;
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
  acc_t d_x, d_y;
  bilinear_gradient<acc_t>(sample.weight, sample.frac_x, sample.frac_y, corner_dot, d_sample, d_x, d_y);
  // The chain rule through x = loc_x * W - 0.5.
  d_loc_x = d_x * static_cast<acc_t>(width);
  d_loc_y = d_y * static_cast<acc_t>(height);
}

// Sizes of one call: value (B, S, h, D), sampling_locations (B, Q, h, L, P, 2).
struct ProblemSizes {
  int64_t batch;        // B
  int64_t num_values;   // S
  int64_t num_heads;    // h
  int64_t head_dim;     // D
  int64_t num_queries;  // Q
  int64_t num_levels;   // L
  int64_t num_points;   // P
};

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
