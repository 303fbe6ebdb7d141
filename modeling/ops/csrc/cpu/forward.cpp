// CPU forward of multi-scale deformable attention: parallel over (batch, head, block of queries) items.
//
// Per block, the vectorised per-sample setup of all its samples (sample_setup.h), then per query one branch-free
// multiply-add sweep over the channels of its corner rows: corners outside the map read the zero row appended to the
// per-head value copy, with weight 0.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/ms_deform_attn_cpu.h"
#include "cpu/sample_setup.h"
#include "cpu/simd.h"
#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {
namespace {

// Work items [begin, end) of the flattened (batch, head, query block) axis. Consecutive items share a head, whose
// value rows are copied once into a per-thread buffer (copy_head_rows) and stay in L2 while its queries sample them.
// Per block: gather its locations and weights, the vectorised setup of all its samples (setup_samples), then per
// query one branch-free multiply-add sweep over the corners; corners outside the map read the zero row, weight 0.
// kHeadDim > 0: head_dim is that compile-time multiple of the vector width; 0: any head_dim, scalar loops.
template <typename scalar_t, int kHeadDim>
MSDA_ALWAYS_INLINE void forward_rows(const Problem& problem, const scalar_t* value, const scalar_t* sampling_locations,
                                     const scalar_t* attention_weights, scalar_t* output, int64_t begin, int64_t end) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : problem.head_dim;
  const int64_t row_stride = head_dim;  // elements between rows s and s + 1 of the per-head copy
  const int64_t output_row_stride = problem.num_heads * head_dim;
  thread_local std::vector<scalar_t> head_rows;
  const scalar_t* head_value = nullptr;
  int64_t copied_task = -1;
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  const int64_t zero_row = problem.num_values;
  const LevelTable<acc_t> table(problem, kQueryBlock);
  SampleSetup<acc_t> setup(kQueryBlock * samples_per_head);
  std::vector<acc_t> scalar_accumulator(kHeadDim > 0 ? 0 : head_dim);
  // The block's locations and attention weights, gathered from the (B, Q, h, L, P[, 2]) inputs into one contiguous
  // run: cheaper than a head-major copy of the whole tensors.
  std::vector<scalar_t> block_locations(2 * kQueryBlock * samples_per_head);
  std::vector<scalar_t> block_attention(kQueryBlock * samples_per_head);

  const int64_t num_blocks = (problem.num_queries + kQueryBlock - 1) / kQueryBlock;
  for (int64_t block_item = begin; block_item < end; ++block_item) {
    const int64_t batch_index = block_item / (problem.num_heads * num_blocks);
    const int64_t head = (block_item / num_blocks) % problem.num_heads;
    const int64_t first_query = (block_item % num_blocks) * kQueryBlock;
    const int64_t last_query = std::min(first_query + kQueryBlock, problem.num_queries);
    gather_block_inputs(problem, sampling_locations, attention_weights, batch_index, head, first_query, last_query,
                        block_locations.data(), block_attention.data());
    setup_samples<false, scalar_t, acc_t>((last_query - first_query) * samples_per_head, block_locations.data(),
                                          block_attention.data(), table, zero_row, row_stride, setup);
    if (block_item + 1 < end && last_query < problem.num_queries) {
      prefetch_block_inputs<scalar_t>(problem, sampling_locations, attention_weights, nullptr, batch_index, head,
                                      last_query, std::min(last_query + kQueryBlock, problem.num_queries));
    }
    if (batch_index * problem.num_heads + head != copied_task) {
      copied_task = batch_index * problem.num_heads + head;
      head_value = copy_head_rows<scalar_t, kHeadDim>(problem, value, batch_index, head, head_dim, head_rows);
    }
    for (int64_t query = first_query; query < last_query; ++query) {
      const int64_t first_index = (query - first_query) * samples_per_head;
      scalar_t* output_row =
          output + (batch_index * problem.num_queries + query) * output_row_stride + head * head_dim;
#if MSDA_HAVE_VECTOR_EXTENSIONS
      if constexpr (kHeadDim > 0) {
        using Vector = ChannelVector<scalar_t>;
        using vec_t = typename Vector::vec_t;
        constexpr int kVectors = kHeadDim / Vector::kLanes;
        // Two accumulator sets (upper and lower corner pair) halve the chain of dependent multiply-adds, which
        // otherwise bounds the sweep by the FMA latency.
        vec_t upper[kVectors], lower[kVectors];
        for (int block = 0; block < kVectors; ++block) upper[block] = lower[block] = vec_t{};
        // The corner rows of the query after next, requested now so that their L2 latency overlaps this query's
        // sweep: only the first line of the top and of the bottom row pair (the hardware fetches the adjacent
        // lines, and further requests cost more issue slots than they save).
        if (query + 2 < last_query) {
          const int64_t ahead_index = first_index + 2 * samples_per_head;
          for (int64_t index = ahead_index; index < ahead_index + samples_per_head; ++index) {
            __builtin_prefetch(head_value + setup.row[0][index]);
            __builtin_prefetch(head_value + setup.row[2][index]);
          }
        }
        for (int64_t index = first_index; index < first_index + samples_per_head; ++index) {
          const vec_t weight0 = vec_t{} + setup.weight[0][index];
          const vec_t weight1 = vec_t{} + setup.weight[1][index];
          const vec_t weight2 = vec_t{} + setup.weight[2][index];
          const vec_t weight3 = vec_t{} + setup.weight[3][index];
          const scalar_t* row0 = head_value + setup.row[0][index];
          const scalar_t* row1 = head_value + setup.row[1][index];
          const scalar_t* row2 = head_value + setup.row[2][index];
          const scalar_t* row3 = head_value + setup.row[3][index];
          MSDA_UNROLL
          for (int block = 0; block < kVectors; ++block) {
            const int lane = block * Vector::kLanes;
            upper[block] += weight0 * Vector::load(row0 + lane) + weight1 * Vector::load(row1 + lane);
            lower[block] += weight2 * Vector::load(row2 + lane) + weight3 * Vector::load(row3 + lane);
          }
        }
        for (int block = 0; block < kVectors; ++block) {
          Vector::store(output_row + block * Vector::kLanes, upper[block] + lower[block]);
        }
        continue;
      }
#endif
      acc_t* accumulator = scalar_accumulator.data();
      for (int64_t channel = 0; channel < head_dim; ++channel) accumulator[channel] = acc_t(0);
      for (int64_t index = first_index; index < first_index + samples_per_head; ++index) {
        for (int corner = 0; corner < 4; ++corner) {
          const acc_t corner_weight = setup.weight[corner][index];
          const scalar_t* corner_value = head_value + setup.row[corner][index];
#pragma omp simd
          for (int64_t channel = 0; channel < head_dim; ++channel) {
            accumulator[channel] += corner_weight * static_cast<acc_t>(corner_value[channel]);
          }
        }
      }
      for (int64_t channel = 0; channel < head_dim; ++channel) output_row[channel] = scalar_t(accumulator[channel]);
    }
  }
}

}  // namespace

// One multiversioned entry point per dtype (target_clones needs plain, non-template functions).
#define MSDA_DEFINE_FORWARD(scalar_type)                                                                          \
  MSDA_CPU_CLONES void forward_query_blocks(const Problem& problem, const scalar_type* value,                     \
                                            const scalar_type* sampling_locations,                                \
                                            const scalar_type* attention_weights, scalar_type* output,            \
                                            int64_t begin, int64_t end) {                                         \
    using scalar_t = scalar_type;                                                                                 \
    MSDA_DISPATCH_HEAD_DIM(problem.head_dim, forward_rows, problem, value, sampling_locations, attention_weights, \
                           output, begin, end)                                                                    \
  }
MSDA_DEFINE_FORWARD(float)
MSDA_DEFINE_FORWARD(double)
MSDA_DEFINE_FORWARD(c10::BFloat16)

}  // namespace msda
}  // namespace mask2former
