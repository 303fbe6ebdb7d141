// CPU backward of multi-scale deformable attention: parallel over (batch, head) tasks.
//
// Each task owns grad_value[b, :, head, :] and the location/weight gradients of (b, head), and walks its queries in
// order, so there are no atomics and the result is bitwise identical for any thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/ms_deform_attn_cpu.h"
#include "cpu/sample_setup.h"
#include "cpu/simd.h"
#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {
namespace {

// A sample with no corner inside the map gets zero dot products (so zero location and weight gradients) and makes
// no grad_value update.
template <typename acc_t>
MSDA_ALWAYS_INLINE bool outside_the_map(const SampleSetup<acc_t>& setup, int64_t index, acc_t* dot_sums) {
  if (setup.inside[index]) return false;
  for (int corner = 0; corner < 4; ++corner) dot_sums[corner] = acc_t(0);
  return true;
}

// One (batch, head) task of the backward pass. The task owns grad_value[b, :, head, :] (accumulated in an acc_t tile,
// fp32 for bf16 inputs, with a zero row that takes the weight-0 updates of outside corners) and the (b, head) run of
// the head-major location/weight gradients, and walks its queries in order, so there are no atomics and every
// grad_value row receives its updates in the same order for any thread count.
// Phases per block of queries: the vectorised setup of its samples; per sample the four <grad_output, corner row>
// dot products and the four grad_value row updates in one sweep over the channels; per chunk of 8 (fp32) or 4
// (fp64) samples, the location and weight gradients in one vector step of the header's bilinear_gradient.
template <typename scalar_t, int kHeadDim>
MSDA_ALWAYS_INLINE void backward_task(const Problem& problem, const scalar_t* value,
                                      const scalar_t* sampling_locations, const scalar_t* attention_weights,
                                      const scalar_t* grad_output, scalar_t* grad_value,
                                      scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights,
                                      int64_t task) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : problem.head_dim;
  const int64_t row_stride = head_dim;  // elements between rows s and s + 1 of the per-head copy
  const int64_t output_row_stride = problem.num_heads * head_dim;
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  const int64_t head = task % problem.num_heads;
  const int64_t batch_index = task / problem.num_heads;
  thread_local std::vector<scalar_t> head_rows;
  const scalar_t* head_value =
      copy_head_rows<scalar_t, kHeadDim>(problem, value, batch_index, head, head_dim, head_rows);
  // The task's value gradient accumulates in a local (S + 1, D) tile with the value copy's row offsets (the extra
  // row takes the weight-0 updates of outside corners), then goes to grad_value[b, :, head, :] once at the end.
  // The tile starts 1536 bytes (mod 4096) after the value rows: equal buffers from malloc would otherwise sit at
  // the same page offsets, and every grad row store would falsely alias (4K aliasing) the next loads of the same
  // row's values; 1536 keeps the corner rows' offsets (0, 1, W, W + 1 rows apart) clear of each other.
  thread_local std::vector<acc_t> grad_value_tile;
  const int64_t tile_size = (problem.num_values + 1) * head_dim;
  grad_value_tile.resize(tile_size + 4096 / sizeof(acc_t));
  const uintptr_t wanted_offset = (reinterpret_cast<uintptr_t>(head_value) + 1536) % 4096;
  const uintptr_t tile_offset = reinterpret_cast<uintptr_t>(grad_value_tile.data()) % 4096;
  const uintptr_t shift_bytes = (wanted_offset + 4096 - tile_offset) % 4096;
  acc_t* head_grad_value = grad_value_tile.data() + shift_bytes / sizeof(acc_t);
  std::fill(head_grad_value, head_grad_value + tile_size, acc_t(0));
  const int64_t zero_row = problem.num_values;
  const LevelTable<acc_t> table(problem, kQueryBlock);
  SampleSetup<acc_t> setup(kQueryBlock * samples_per_head);
  // A block's inputs gathered from, and its location/weight gradients scattered to, the (B, Q, h, ...) tensors in
  // whole runs: the per-sample strided accesses would each miss the cache.
  std::vector<scalar_t> block_locations(2 * kQueryBlock * samples_per_head);
  std::vector<scalar_t> block_attention(kQueryBlock * samples_per_head);
  // Buffers read or written a vector of samples at a time are padded to whole vectors.
  constexpr int kChunk = SetupLanes<acc_t>::kLanes;
  const int64_t padded_samples = padded_count<acc_t>(kQueryBlock * samples_per_head);
  std::vector<scalar_t> block_grad_locations(2 * padded_samples);
  std::vector<scalar_t> block_grad_attention(padded_samples);
  std::vector<acc_t> block_grad_output(kQueryBlock * head_dim);
  std::vector<acc_t> block_attention_acc(padded_samples);  // the attention weights in acc_t
  std::vector<acc_t> block_dots(4 * padded_samples);      // channel sums of the dot products, (sample, corner)

  for (int64_t first_query = 0; first_query < problem.num_queries; first_query += kQueryBlock) {
    const int64_t last_query = std::min(first_query + kQueryBlock, problem.num_queries);
    gather_block_inputs(problem, sampling_locations, attention_weights, batch_index, head, first_query, last_query,
                        block_locations.data(), block_attention.data());
    for (int64_t query = first_query; query < last_query; ++query) {
      const scalar_t* grad_output_row =
          grad_output + (batch_index * problem.num_queries + query) * output_row_stride + head * head_dim;
      acc_t* grad_row = block_grad_output.data() + (query - first_query) * head_dim;
      for (int64_t channel = 0; channel < head_dim; ++channel) {
        grad_row[channel] = static_cast<acc_t>(grad_output_row[channel]);
      }
    }
    setup_samples<true, scalar_t, acc_t>((last_query - first_query) * samples_per_head, block_locations.data(),
                                         static_cast<const scalar_t*>(nullptr), table, zero_row, row_stride, setup);
    if (last_query < problem.num_queries) {
      prefetch_block_inputs<scalar_t>(problem, sampling_locations, attention_weights, grad_output, batch_index, head,
                                      last_query, std::min(last_query + kQueryBlock, problem.num_queries));
    }
    const int64_t block_samples = (last_query - first_query) * samples_per_head;
    // Per query (its grad_output row stays in registers), per sample: the four <grad_output, corner row> dot
    // products and the four grad_value row updates in one sweep over the channels; the dot products' channel sums
    // go to block_dots as (sample, corner).
    for (int64_t query = first_query; query < last_query; ++query) {
      const acc_t* grad = block_grad_output.data() + (query - first_query) * head_dim;
      const int64_t first_index = (query - first_query) * samples_per_head;
#if MSDA_HAVE_VECTOR_EXTENSIONS
      if constexpr (kHeadDim > 0) {
        using Vector = ChannelVector<scalar_t>;
        using AccVector = ChannelVector<acc_t>;
        using vec_t = typename Vector::vec_t;
        constexpr int kLanes = Vector::kLanes;
        constexpr int kVectors = kHeadDim / kLanes;
        vec_t g[kVectors];
        for (int block = 0; block < kVectors; ++block) g[block] = AccVector::load(grad + block * kLanes);
        // The next query's rows, requested now so that their latency overlaps this query's sweep: only the first
        // line of the top and bottom row pairs of value and of the grad tile, as in the forward.
        if (query + 1 < last_query) {
          for (int64_t index = first_index + samples_per_head; index < first_index + 2 * samples_per_head; ++index) {
            __builtin_prefetch(head_value + setup.row[0][index]);
            __builtin_prefetch(head_value + setup.row[2][index]);
            __builtin_prefetch(head_grad_value + setup.row[0][index], 1);
            __builtin_prefetch(head_grad_value + setup.row[2][index], 1);
          }
        }
        for (int64_t index = first_index; index < first_index + samples_per_head; ++index) {
          acc_t* dot_sums = block_dots.data() + 4 * index;
          if (outside_the_map(setup, index, dot_sums)) continue;
          const acc_t attention = static_cast<acc_t>(block_attention[index]);
          vec_t dots[4] = {vec_t{}, vec_t{}, vec_t{}, vec_t{}};
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t row_offset = setup.row[corner][index];
            const scalar_t* corner_value = head_value + row_offset;
            acc_t* corner_grad = head_grad_value + row_offset;
            const acc_t corner_weight = attention * setup.weight[corner][index];
            MSDA_UNROLL
            for (int block = 0; block < kVectors; ++block) {
              dots[corner] += g[block] * Vector::load(corner_value + block * kLanes);
              acc_t* grad_row = corner_grad + block * kLanes;
              AccVector::store(grad_row, AccVector::load(grad_row) + corner_weight * g[block]);
            }
          }
          if constexpr (kLanes == 8 && std::is_same_v<acc_t, float>) {
            const float8_t sums = horizontal_sums_of_four(dots[0], dots[1], dots[2], dots[3]);
            std::memcpy(dot_sums, &sums, 4 * sizeof(float));  // lanes 0-3
          } else {
            for (int corner = 0; corner < 4; ++corner) dot_sums[corner] = horizontal_sum<vec_t, kLanes>(dots[corner]);
          }
        }
        continue;
      }
#endif
      for (int64_t index = first_index; index < first_index + samples_per_head; ++index) {
        acc_t* dot_sums = block_dots.data() + 4 * index;
        if (outside_the_map(setup, index, dot_sums)) continue;
        const acc_t attention = static_cast<acc_t>(block_attention[index]);
        const scalar_t* value0 = head_value + setup.row[0][index];
        const scalar_t* value1 = head_value + setup.row[1][index];
        const scalar_t* value2 = head_value + setup.row[2][index];
        const scalar_t* value3 = head_value + setup.row[3][index];
        acc_t* grad0 = head_grad_value + setup.row[0][index];
        acc_t* grad1 = head_grad_value + setup.row[1][index];
        acc_t* grad2 = head_grad_value + setup.row[2][index];
        acc_t* grad3 = head_grad_value + setup.row[3][index];
        const acc_t weight0 = attention * setup.weight[0][index];
        const acc_t weight1 = attention * setup.weight[1][index];
        const acc_t weight2 = attention * setup.weight[2][index];
        const acc_t weight3 = attention * setup.weight[3][index];
        acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
        // Corners may share the zero row (all weight 0), so the updates go one after another, not in parallel.
        for (int64_t channel = 0; channel < head_dim; ++channel) {
          const acc_t g = grad[channel];
          dot0 += g * static_cast<acc_t>(value0[channel]);
          dot1 += g * static_cast<acc_t>(value1[channel]);
          dot2 += g * static_cast<acc_t>(value2[channel]);
          dot3 += g * static_cast<acc_t>(value3[channel]);
          grad0[channel] += weight0 * g;
          grad1[channel] += weight1 * g;
          grad2[channel] += weight2 * g;
          grad3[channel] += weight3 * g;
        }
        dot_sums[0] = dot0;
        dot_sums[1] = dot1;
        dot_sums[2] = dot2;
        dot_sums[3] = dot3;
      }
    }
    // The block's location and weight gradients, kChunk samples per vector step through the header's
    // bilinear_gradient: d_sample = sum_c weight_c * dot_c (the attention-weight gradient) and the pixel-coordinate
    // gradients, times W (H) for the normalised location and times the attention weight.
    for (int64_t index = 0; index < block_samples; ++index) {
      block_attention_acc[index] = static_cast<acc_t>(block_attention[index]);
    }
    using setup_vec_t = typename SetupLanes<acc_t>::vec_t;
    for (int64_t chunk_first = 0; chunk_first < block_samples; chunk_first += kChunk) {
      setup_vec_t dot[4];
      const acc_t* chunk_dots = block_dots.data() + 4 * chunk_first;
      if constexpr (kChunk == 8 && std::is_same_v<acc_t, float>) {
        // (sample, corner) -> one vector per corner: p01 = [s0 c0..c3 | s1 c0..c3], ...
        const float8_t p01 = load_vector<float8_t>(chunk_dots);
        const float8_t p23 = load_vector<float8_t>(chunk_dots + 8);
        const float8_t p45 = load_vector<float8_t>(chunk_dots + 16);
        const float8_t p67 = load_vector<float8_t>(chunk_dots + 24);
        // [s0c0 s2c0 s0c1 s2c1 | s1c0 s3c0 s1c1 s3c1], [s0c2 s2c2 s0c3 s2c3 | s1c2 s3c2 s1c3 s3c3], likewise s4..s7
        const float8_t t0 = __builtin_shufflevector(p01, p23, 0, 8, 1, 9, 4, 12, 5, 13);
        const float8_t t1 = __builtin_shufflevector(p01, p23, 2, 10, 3, 11, 6, 14, 7, 15);
        const float8_t t2 = __builtin_shufflevector(p45, p67, 0, 8, 1, 9, 4, 12, 5, 13);
        const float8_t t3 = __builtin_shufflevector(p45, p67, 2, 10, 3, 11, 6, 14, 7, 15);
        // corner c over samples in the order [s0 s2 s4 s6 | s1 s3 s5 s7], then back to s0..s7
        const float8_t by_corner[4] = {__builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13),
                                       __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15),
                                       __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13),
                                       __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15)};
        for (int corner = 0; corner < 4; ++corner) {
          dot[corner] = __builtin_shufflevector(by_corner[corner], by_corner[corner], 0, 4, 1, 5, 2, 6, 3, 7);
        }
      } else {
        alignas(32) acc_t corner_dot[4][kChunk];
        for (int lane = 0; lane < kChunk; ++lane) {
          for (int corner = 0; corner < 4; ++corner) corner_dot[corner][lane] = chunk_dots[4 * lane + corner];
        }
        for (int corner = 0; corner < 4; ++corner) dot[corner] = load_vector<setup_vec_t>(corner_dot[corner]);
      }
      setup_vec_t weight[4];
      for (int corner = 0; corner < 4; ++corner) {
        weight[corner] = load_vector<setup_vec_t>(setup.weight[corner].data() + chunk_first);
      }
      setup_vec_t d_sample, d_x, d_y;
      bilinear_gradient<setup_vec_t, acc_t>(weight, load_vector<setup_vec_t>(setup.frac_x.data() + chunk_first),
                                            load_vector<setup_vec_t>(setup.frac_y.data() + chunk_first), dot,
                                            d_sample, d_x, d_y);
      const setup_vec_t attention = load_vector<setup_vec_t>(block_attention_acc.data() + chunk_first);
      const setup_vec_t d_loc_x = attention * (d_x * load_vector<setup_vec_t>(table.width_f.data() + chunk_first));
      const setup_vec_t d_loc_y = attention * (d_y * load_vector<setup_vec_t>(table.height_f.data() + chunk_first));
      // The buffers are padded to whole vectors; lanes past the block's end are never copied out.
      if constexpr (kChunk == 8 && std::is_same_v<scalar_t, float>) {
        store_vector(block_grad_attention.data() + chunk_first, d_sample);
        store_vector(block_grad_locations.data() + 2 * chunk_first,
                     __builtin_shufflevector(d_loc_x, d_loc_y, 0, 8, 1, 9, 2, 10, 3, 11));
        store_vector(block_grad_locations.data() + 2 * chunk_first + 8,
                     __builtin_shufflevector(d_loc_x, d_loc_y, 4, 12, 5, 13, 6, 14, 7, 15));
      } else {
        for (int lane = 0; lane < kChunk; ++lane) {
          block_grad_attention[chunk_first + lane] = scalar_t(d_sample[lane]);
          block_grad_locations[2 * (chunk_first + lane)] = scalar_t(d_loc_x[lane]);
          block_grad_locations[2 * (chunk_first + lane) + 1] = scalar_t(d_loc_y[lane]);
        }
      }
    }
    // The block's gradients are one run of the task's head-major (h, B, Q, L, P[, 2]) region.
    const int64_t target =
        ((head * problem.batch + batch_index) * problem.num_queries + first_query) * samples_per_head;
    std::memcpy(grad_sampling_locations + 2 * target, block_grad_locations.data(),
                2 * block_samples * sizeof(scalar_t));
    std::memcpy(grad_attention_weights + target, block_grad_attention.data(), block_samples * sizeof(scalar_t));
  }
  // (S, D) tile -> grad_value[b, :, head, :] of the dense (B, S, h, D) result, in its dtype.
  scalar_t* output_rows = grad_value + (batch_index * problem.num_values * problem.num_heads + head) * head_dim;
  for (int64_t position = 0; position < problem.num_values; ++position) {
    const acc_t* tile_row = head_grad_value + position * head_dim;
    scalar_t* output_row = output_rows + position * problem.num_heads * head_dim;
    for (int64_t channel = 0; channel < head_dim; ++channel) output_row[channel] = scalar_t(tile_row[channel]);
  }
}

}  // namespace

// One multiversioned entry point per dtype (target_clones needs plain, non-template functions).
#define MSDA_DEFINE_BACKWARD(scalar_type)                                                                          \
  MSDA_CPU_CLONES void backward_head_task(const Problem& problem, const scalar_type* value,                       \
                                          const scalar_type* sampling_locations,                                  \
                                          const scalar_type* attention_weights, const scalar_type* grad_output,   \
                                          scalar_type* grad_value, scalar_type* grad_sampling_locations,          \
                                          scalar_type* grad_attention_weights, int64_t task) {                    \
    using scalar_t = scalar_type;                                                                                  \
    MSDA_DISPATCH_HEAD_DIM(problem.head_dim, backward_task, problem, value, sampling_locations, attention_weights, \
                           grad_output, grad_value, grad_sampling_locations, grad_attention_weights, task)         \
  }
MSDA_DEFINE_BACKWARD(float)
MSDA_DEFINE_BACKWARD(double)
MSDA_DEFINE_BACKWARD(c10::BFloat16)

}  // namespace msda
}  // namespace mask2former
