// Sampling setup of the CPU kernels: the level table, the vectorised per-sample setup (corner rows and bilinear
// weights of a run of samples), the gathers and prefetches of a query block's inputs, and the per-head value copy.
//
// Which sampling math is shared with the CUDA kernels: setup_samples calls the header's pixel_coordinate,
// location_inside and corner_weights (and the backward its bilinear_gradient) on vectors of 8 (fp32) or 4 (fp64)
// samples; the floor, the corner validity and the corner row offsets are its own vector code, the counterpart of the
// scalar lines in the header's bilinear_sample that the CUDA kernels call. tests/modeling/ops/test_sample_setup.py
// checks the two halves against each other bit for bit.
// Torch-light (c10's BFloat16 only), so host test programs can include it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ms_deform_attn_cpu.h"
#include "cpu/simd.h"
#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {

// Level parameters of every sample of a query block, in the kernels' sample order (query, level, point): the
// per-sample setup below then reads them as vectors, without divisions.
template <typename acc_t>
struct LevelTable {
  using int_t = typename SetupLanes<acc_t>::int_t;
  std::vector<acc_t> width_f, height_f;
  std::vector<int_t> width, height, first_row;
  LevelTable(const Problem& problem, int64_t num_queries) {
    const int64_t count = padded_count<acc_t>(num_queries * problem.num_levels * problem.num_points);
    width_f.resize(count);
    height_f.resize(count);
    width.resize(count);
    height.resize(count);
    first_row.resize(count);
    for (int64_t index = 0; index < count; ++index) {
      const int64_t level = (index / problem.num_points) % problem.num_levels;
      height[index] = static_cast<int_t>(problem.spatial_shapes[2 * level]);
      width[index] = static_cast<int_t>(problem.spatial_shapes[2 * level + 1]);
      height_f[index] = static_cast<acc_t>(problem.spatial_shapes[2 * level]);
      width_f[index] = static_cast<acc_t>(problem.spatial_shapes[2 * level + 1]);
      first_row[index] = static_cast<int_t>(problem.level_start[level]);
    }
  }
};

// Corner rows and bilinear weights of a run of samples, one array per quantity (structure of arrays).
template <typename acc_t>
struct SampleSetup {
  using int_t = typename SetupLanes<acc_t>::int_t;
  std::vector<int_t> row[4];     // value row of each corner inside its (batch, head); the zero row where outside
  std::vector<acc_t> weight[4];  // bilinear weight of each corner, 0 where outside
  std::vector<acc_t> frac_x, frac_y;
  std::vector<int_t> inside;  // nonzero: some corner inside the map (else the sample and its gradients are zero)
  explicit SampleSetup(int64_t count)
      : frac_x(padded_count<acc_t>(count)), frac_y(padded_count<acc_t>(count)), inside(padded_count<acc_t>(count)) {
    for (int corner = 0; corner < 4; ++corner) {
      row[corner].resize(padded_count<acc_t>(count));
      weight[corner].resize(padded_count<acc_t>(count));
    }
  }
};

// Per-sample setup of `count` consecutive samples (locations as (x, y) pairs), a vector of samples at a time, through
// the shared header's pixel_coordinate, location_inside and corner_weights (the functions bilinear_sample builds on
// for the GPU), with masks instead of branches. Corners outside the map get weight 0 and the row index `zero_row`, a
// zero row the callers append to every (batch, head), so the channel sweeps need no branch either.
// `attention` (may be null): the samples' attention weights, folded into the corner weights. Rows are returned
// premultiplied by `row_stride` (element offsets). kGradientTerms: also store frac_x, frac_y and inside (the
// backward needs them, the forward does not).
template <bool kGradientTerms, typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void setup_samples(int64_t count, const scalar_t* locations, const scalar_t* attention,
                                      const LevelTable<acc_t>& table, int64_t zero_row, int64_t row_stride,
                                      SampleSetup<acc_t>& out) {
  using Lanes = SetupLanes<acc_t>;
  using vec_t = typename Lanes::vec_t;
  using ivec_t = typename Lanes::ivec_t;
  using int_t = typename Lanes::int_t;
  constexpr int kLanes = Lanes::kLanes;
  const vec_t one = vec_t{} + static_cast<acc_t>(1);
  const ivec_t zero_rows = ivec_t{} + static_cast<int_t>(zero_row * row_stride);
  for (int64_t first = 0; first < count; first += kLanes) {
    vec_t location_x, location_y;
    vec_t scale = one;  // the attention weights (1 without attention)
    bool whole_vector = false;
    if constexpr (std::is_same_v<scalar_t, acc_t>) whole_vector = first + kLanes <= count;
    if (whole_vector) {
      // Whole vector: two contiguous loads of (x, y) pairs, split into x and y lanes.
      const vec_t pairs_low = load_vector<vec_t>(locations + 2 * first);
      const vec_t pairs_high = load_vector<vec_t>(locations + 2 * first + kLanes);
      if constexpr (kLanes == 8) {
        location_x = __builtin_shufflevector(pairs_low, pairs_high, 0, 2, 4, 6, 8, 10, 12, 14);
        location_y = __builtin_shufflevector(pairs_low, pairs_high, 1, 3, 5, 7, 9, 11, 13, 15);
      } else {
        location_x = __builtin_shufflevector(pairs_low, pairs_high, 0, 2, 4, 6);
        location_y = __builtin_shufflevector(pairs_low, pairs_high, 1, 3, 5, 7);
      }
      if (attention != nullptr) scale = load_vector<vec_t>(attention + first);
    } else {
      alignas(32) acc_t lanes_x[kLanes], lanes_y[kLanes], lanes_attention[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) {
        const int64_t index = first + lane;
        // Past the end: a location inside the map, whose results nobody reads.
        lanes_x[lane] = index < count ? static_cast<acc_t>(locations[2 * index]) : acc_t(0.5);
        lanes_y[lane] = index < count ? static_cast<acc_t>(locations[2 * index + 1]) : acc_t(0.5);
        lanes_attention[lane] =
            attention != nullptr && index < count ? static_cast<acc_t>(attention[index]) : acc_t(1);
      }
      location_x = load_vector<vec_t>(lanes_x);
      location_y = load_vector<vec_t>(lanes_y);
      scale = load_vector<vec_t>(lanes_attention);
    }
    const vec_t width_f = load_vector<vec_t>(table.width_f.data() + first);
    const vec_t height_f = load_vector<vec_t>(table.height_f.data() + first);
    const ivec_t width = load_vector<ivec_t>(table.width.data() + first);
    const ivec_t height = load_vector<ivec_t>(table.height.data() + first);
    const ivec_t first_row = load_vector<ivec_t>(table.first_row.data() + first);
    const vec_t x_raw = pixel_coordinate<vec_t, acc_t>(location_x, width_f);
    const vec_t y_raw = pixel_coordinate<vec_t, acc_t>(location_y, height_f);
    // All ones where some corner is inside the map; NaN locations are outside.
    const ivec_t inside = location_inside<vec_t, acc_t>(x_raw, y_raw, width_f, height_f);
    // Outside samples continue at coordinate +0 (no out-of-range float-to-int conversion).
    const vec_t x = (vec_t)((ivec_t)x_raw & inside);
    const vec_t y = (vec_t)((ivec_t)y_raw & inside);
    // floor() of values in [-1, W): truncate, then step down where truncation rounded up (negative fractions).
    ivec_t x0 = __builtin_convertvector(x, ivec_t);
    ivec_t y0 = __builtin_convertvector(y, ivec_t);
    x0 += (__builtin_convertvector(x0, vec_t) > x);  // true is -1
    y0 += (__builtin_convertvector(y0, vec_t) > y);
    const vec_t fx = x - __builtin_convertvector(x0, vec_t);
    const vec_t fy = y - __builtin_convertvector(y0, vec_t);
    const ivec_t x0_in = inside & (x0 >= 0);
    const ivec_t x1_in = inside & (x0 + 1 < width);
    const ivec_t y0_in = y0 >= 0;
    const ivec_t y1_in = y0 + 1 < height;
    const ivec_t valid[4] = {y0_in & x0_in, y0_in & x1_in, y1_in & x0_in, y1_in & x1_in};
    // The attention weight folded into each corner's bilinear weight: one product per corner here instead of one per
    // channel in the sweeps.
    vec_t weight[4];
    corner_weights<vec_t, acc_t>(fx, fy, weight);
    for (int corner = 0; corner < 4; ++corner) weight[corner] = scale * weight[corner];
    const ivec_t stride = ivec_t{} + static_cast<int_t>(row_stride);
    const ivec_t top_left = (first_row + y0 * width + x0) * stride;
    const ivec_t row[4] = {top_left, top_left + stride, top_left + width * stride, top_left + (width + 1) * stride};
    for (int corner = 0; corner < 4; ++corner) {
      store_vector(out.weight[corner].data() + first, (vec_t)((ivec_t)weight[corner] & valid[corner]));
      store_vector(out.row[corner].data() + first, (row[corner] & valid[corner]) | (zero_rows & ~valid[corner]));
    }
    if constexpr (kGradientTerms) {
      store_vector(out.frac_x.data() + first, fx);
      store_vector(out.frac_y.data() + first, fy);
      store_vector(out.inside.data() + first, inside);
    }
  }
}

// Gathers the locations and attention weights of the queries [first_query, last_query) of (batch_index, head) from
// the (B, Q, h, L, P[, 2]) inputs into contiguous runs, L * P samples per query, which setup_samples then reads as
// whole vectors. memcpy, not inline 32-byte moves: a vector load spanning several separate smaller stores cannot be
// forwarded from the store buffer.
template <typename scalar_t>
MSDA_ALWAYS_INLINE void gather_block_inputs(const Problem& problem, const scalar_t* sampling_locations,
                                            const scalar_t* attention_weights, int64_t batch_index, int64_t head,
                                            int64_t first_query, int64_t last_query, scalar_t* block_locations,
                                            scalar_t* block_attention) {
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  for (int64_t query = first_query; query < last_query; ++query) {
    const int64_t source = batch_index * problem.sample_batch_stride + query * problem.sample_query_stride +
                           head * problem.sample_head_stride;
    const int64_t target = (query - first_query) * samples_per_head;
    std::memcpy(block_locations + 2 * target, sampling_locations + 2 * source,
                2 * samples_per_head * sizeof(scalar_t));
    std::memcpy(block_attention + target, attention_weights + source, samples_per_head * sizeof(scalar_t));
  }
}

// Requests the per-query inputs of the queries [first_query, last_query) of (batch_index, head): their runs of
// locations and attention weights and, when given, their grad_output rows. These runs are strided (one per query,
// hundreds of bytes apart), which the hardware prefetchers follow poorly; fetched while the current block computes,
// they are in cache when the next block gathers them.
template <typename scalar_t>
MSDA_ALWAYS_INLINE void prefetch_block_inputs(const Problem& problem, const scalar_t* sampling_locations,
                                              const scalar_t* attention_weights, const scalar_t* grad_output,
                                              int64_t batch_index, int64_t head, int64_t first_query,
                                              int64_t last_query) {
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  const int64_t location_bytes = 2 * samples_per_head * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t attention_bytes = samples_per_head * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t grad_bytes = problem.head_dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t query = first_query; query < last_query; ++query) {
    const int64_t sample = batch_index * problem.sample_batch_stride + query * problem.sample_query_stride +
                           head * problem.sample_head_stride;
    const char* locations = reinterpret_cast<const char*>(sampling_locations + 2 * sample);
    const char* attention = reinterpret_cast<const char*>(attention_weights + sample);
    for (int64_t byte = 0; byte < location_bytes; byte += 64) __builtin_prefetch(locations + byte);
    __builtin_prefetch(locations + location_bytes - 1);
    for (int64_t byte = 0; byte < attention_bytes; byte += 64) __builtin_prefetch(attention + byte);
    __builtin_prefetch(attention + attention_bytes - 1);
    if (grad_output != nullptr) {
      const char* grad = reinterpret_cast<const char*>(
          grad_output + ((batch_index * problem.num_queries + query) * problem.num_heads + head) * problem.head_dim);
      for (int64_t byte = 0; byte < grad_bytes; byte += 64) __builtin_prefetch(grad + byte);
      __builtin_prefetch(grad + grad_bytes - 1);
    }
  }
}

// Copies value[b, :, head, :] of the dense (B, S, h, D) input into `rows` as S contiguous rows plus one zero row
// (row S): the kernels point corners outside the map at it (weight 0) instead of branching. `rows` is a per-thread
// buffer reused across calls (no allocation or page faults), and the copy leaves the head's rows warm in cache.
// kHeadDim > 0: head_dim is that compile-time size, so each row copy is a few inline vector moves, not a libc call.
template <typename scalar_t, int kHeadDim>
MSDA_ALWAYS_INLINE const scalar_t* copy_head_rows(const Problem& problem, const scalar_t* value, int64_t batch_index,
                                                  int64_t head, int64_t head_dim, std::vector<scalar_t>& rows) {
  // Rows start on a 64-byte boundary, so a 128-byte row spans two cache lines, not three.
  constexpr int64_t kAlignElements = 64 / sizeof(scalar_t);
  rows.resize((problem.num_values + 1) * head_dim + kAlignElements);
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(rows.data()) % 64;
  scalar_t* target = rows.data() + (misalignment == 0 ? 0 : (64 - misalignment) / sizeof(scalar_t));
  const scalar_t* source = value + batch_index * problem.value_batch_stride + head * problem.value_head_stride;
  // The source rows are strided (one per position, h * D elements apart), which the hardware prefetchers follow
  // poorly across pages, so they are requested a few rows ahead.
  constexpr int64_t kPrefetchRows = 8;
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t position = 0; position < problem.num_values; ++position) {
    if (position + kPrefetchRows < problem.num_values) {
      const scalar_t* ahead_row = source + (position + kPrefetchRows) * problem.value_row_stride;
      const char* ahead = reinterpret_cast<const char*>(ahead_row);
      for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(ahead + byte);
    }
    if constexpr (kHeadDim > 0) {
      std::memcpy(target + position * kHeadDim, source + position * problem.value_row_stride,
                  kHeadDim * sizeof(scalar_t));
    } else {
      std::memcpy(target + position * head_dim, source + position * problem.value_row_stride,
                  head_dim * sizeof(scalar_t));
    }
  }
  std::memset(static_cast<void*>(target + problem.num_values * head_dim), 0, head_dim * sizeof(scalar_t));
  return target;
}

}  // namespace msda
}  // namespace mask2former
