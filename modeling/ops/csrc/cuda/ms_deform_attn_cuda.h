// Launchers of the CUDA kernels, declared without torch or CUDA types so that the binding (g++) and the kernel
// translation unit (nvcc) share nothing heavier than this header.
#pragma once

#include <cstdint>

#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {

enum class CudaDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Each thread keeps the first row of every level in a local array of this size (the binding checks num_levels).
constexpr int64_t kCudaMaxLevels = 16;

using CudaProblem = ProblemSizes;

// All tensors contiguous on one device; spatial_shapes is the (L, 2) int64 tensor's device pointer (read by the
// kernels, never by the host). `stream` is a cudaStream_t. Returns a cudaError_t (0 on success).
int launch_ms_deform_attn_forward(CudaDtype dtype, const CudaProblem& problem, const void* value,
                                  const int64_t* spatial_shapes, const void* sampling_locations,
                                  const void* attention_weights, void* output, void* stream);

// Gradients are accumulated in the accumulation type (float for fp32/fp16/bf16, double for fp64) into buffers the
// caller zeroed; the caller casts them back to the input dtype.
int launch_ms_deform_attn_backward(CudaDtype dtype, const CudaProblem& problem, const void* value,
                                   const int64_t* spatial_shapes, const void* sampling_locations,
                                   const void* attention_weights, const void* grad_output, void* grad_value,
                                   void* grad_sampling_locations, void* grad_attention_weights, void* stream);

const char* cuda_error_name(int error);

}  // namespace msda
}  // namespace mask2former
