// Interface of the CPU kernels of multi-scale deformable attention: the problem description the binding
// (binding.cpp) fills from the tensors, and the per-dtype entry points of forward.cpp and backward.cpp.
//
// Translation units by role: simd.h (vector types, per-ISA clones), sample_setup.h (level table, per-sample setup,
// gathers and prefetches), forward.cpp, backward.cpp, binding.cpp (tensor checks, threads, TORCH_LIBRARY_IMPL).
// Torch-light (c10's BFloat16 only), so host test programs can include the kernel headers.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {

// The sizes, plus the strides and level tables the CPU kernels read.
struct Problem : ProblemSizes {
  // Element strides of value (and of the grad_value buffer) along batch, position and head; channels are contiguous.
  int64_t value_batch_stride;
  int64_t value_row_stride;
  int64_t value_head_stride;
  // Strides of sampling_locations / attention_weights along batch, query and head, counted in samples (one
  // sample = one (level, point); its location is 2 elements). The L*P samples of one (b, q, head) are contiguous.
  int64_t sample_batch_stride;
  int64_t sample_query_stride;
  int64_t sample_head_stride;
  const int64_t* spatial_shapes;  // (L, 2) as (H, W)
  const int64_t* level_start;     // (L,) first row of each level
};

// Queries per block: a forward work item (the binding splits (batch, head, block) items among threads) and the
// unit of setup and gathering in both passes. Chosen by measurement: the fastest of 4, 8, 16 and 32 in both passes
// at the encoder shapes of bench/ms_deform_attn.py (figures in bench/RESULTS.md).
constexpr int64_t kQueryBlock = 8;

// Per-dtype entry points, overloaded on the scalar type (fp32, fp64, bf16); each is compiled once per ISA.
//
// forward_query_blocks: writes output (B, Q, h * D) for the flattened (batch, head, query block) items
// [begin, end), from a dense (B, S, h, D) value and dense (B, Q, h, L, P[, 2]) locations and weights.
//
// backward_head_task: one (batch, head) task of the backward. Writes grad_value[b, :, head, :] of the dense
// (B, S, h, D) result and the (b, head) run of the location and weight gradients, which are stored head-major,
// (h, B, Q, L, P[, 2]): the binding allocates them so and returns (B, Q, h, ...) views, and the Python fake kernel
// (ms_deform_attn.py, `_cpu_head_major`) gives the same strides.
#define MSDA_DECLARE_CPU_ENTRY_POINTS(scalar_t)                                                                     \
  void forward_query_blocks(const Problem& problem, const scalar_t* value, const scalar_t* sampling_locations,     \
                            const scalar_t* attention_weights, scalar_t* output, int64_t begin, int64_t end);      \
  void backward_head_task(const Problem& problem, const scalar_t* value, const scalar_t* sampling_locations,       \
                          const scalar_t* attention_weights, const scalar_t* grad_output, scalar_t* grad_value,    \
                          scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights, int64_t task);
MSDA_DECLARE_CPU_ENTRY_POINTS(float)
MSDA_DECLARE_CPU_ENTRY_POINTS(double)
MSDA_DECLARE_CPU_ENTRY_POINTS(c10::BFloat16)
#undef MSDA_DECLARE_CPU_ENTRY_POINTS

// The instruction-set clone the CPU kernels dispatch to on this machine: "avx512", "avx2" or "default".
const char* cpu_kernel_isa();

}  // namespace msda
}  // namespace mask2former
