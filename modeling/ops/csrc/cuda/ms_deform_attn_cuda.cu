// CUDA kernels of multi-scale deformable attention: one thread per (batch, query, head, channel).
//
// Torch-light on purpose (no ATen tensor headers): the CPU-only torch of CI can still compile this file with nvcc.
// fp32 / fp64 / fp16 / bf16 inputs; accumulation and the sampling locations are in fp32 (fp64 for fp64 inputs).
// Backward: the location and attention-weight gradients are sums over the head's channels, so they are reduced
// across the channel lanes with warp shuffles and written once per (query, head, level, point) by one lane (a
// plain store when the head fits in one warp); only grad_value, scattered to four corners, needs atomics.
#include <cuda_runtime.h>

#include <ATen/cuda/Atomic.cuh>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/ms_deform_attn_cuda.h"
#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

template <typename scalar_t>
struct CudaAccType {
  using type = float;
};
template <>
struct CudaAccType<double> {
  using type = double;
};

// Whether `level` (its first row from the header's level_start_rows) lies inside the value tensor. The shapes live on
// the device, where the binding cannot check them without a host sync, and a malformed (L, 2) tensor must not read
// out of bounds: such levels are treated as empty.
__device__ __forceinline__ bool level_inside(const int64_t* spatial_shapes, const int64_t* level_start, int64_t level,
                                             int64_t num_values, int64_t& height, int64_t& width) {
  height = spatial_shapes[2 * level];
  width = spatial_shapes[2 * level + 1];
  return height > 0 && width > 0 && level_start[level] >= 0 && level_start[level] + height * width <= num_values;
}

template <typename scalar_t>
__global__ void forward_kernel(CudaProblem problem, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ spatial_shapes,
                               const scalar_t* __restrict__ sampling_locations,
                               const scalar_t* __restrict__ attention_weights, scalar_t* __restrict__ output) {
  using acc_t = typename CudaAccType<scalar_t>::type;
  const int64_t head_dim = problem.head_dim;
  const int64_t total = problem.batch * problem.num_queries * problem.num_heads * head_dim;
  const int64_t row_stride = problem.num_heads * head_dim;
  int64_t level_start[kCudaMaxLevels];
  level_start_rows(spatial_shapes, problem.num_levels, level_start);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // output (B, Q, h*D) flattened is exactly (b, q, head, channel)
    const int64_t channel = index % head_dim;
    const int64_t head = (index / head_dim) % problem.num_heads;
    const int64_t batch_query = index / row_stride;
    const int64_t batch_index = batch_query / problem.num_queries;
    acc_t accumulator = 0;
    for (int64_t level = 0; level < problem.num_levels; ++level) {
      int64_t height, width;
      if (!level_inside(spatial_shapes, level_start, level, problem.num_values, height, width)) continue;
      const scalar_t* level_value =
          value + (batch_index * problem.num_values + level_start[level]) * row_stride + head * head_dim + channel;
      const int64_t first_sample = ((batch_query * problem.num_heads + head) * problem.num_levels + level) *
                                   problem.num_points;
      for (int64_t point = 0; point < problem.num_points; ++point) {
        const int64_t sample_index = first_sample + point;
        BilinearSample<acc_t> sample;
        if (!bilinear_sample<acc_t>(static_cast<acc_t>(sampling_locations[2 * sample_index]),
                                    static_cast<acc_t>(sampling_locations[2 * sample_index + 1]), height, width,
                                    sample)) {
          continue;
        }
        accumulator += static_cast<acc_t>(attention_weights[sample_index]) *
                       sample_channel<acc_t>(level_value, row_stride, sample);
      }
    }
    output[index] = static_cast<scalar_t>(accumulator);
  }
}

// `segment`: lanes that share one (query, head) and are summed with shuffles (a power of two dividing 32), or 0 when
// head_dim allows no aligned grouping (every lane then adds its own share atomically). `exclusive`: the segment is
// the whole head, so its first lane owns the location/weight gradient and stores it without atomics.
template <typename scalar_t>
__global__ void backward_kernel(CudaProblem problem, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ spatial_shapes,
                                const scalar_t* __restrict__ sampling_locations,
                                const scalar_t* __restrict__ attention_weights,
                                const scalar_t* __restrict__ grad_output,
                                typename CudaAccType<scalar_t>::type* __restrict__ grad_value,
                                typename CudaAccType<scalar_t>::type* __restrict__ grad_sampling_locations,
                                typename CudaAccType<scalar_t>::type* __restrict__ grad_attention_weights,
                                int segment, bool exclusive) {
  using acc_t = typename CudaAccType<scalar_t>::type;
  const int64_t head_dim = problem.head_dim;
  const int64_t total = problem.batch * problem.num_queries * problem.num_heads * head_dim;
  // Whole warps iterate together (padded total, stride a multiple of 32), so every lane reaches every shuffle.
  const int64_t padded_total = (total + kWarpSize - 1) / kWarpSize * kWarpSize;
  const int64_t row_stride = problem.num_heads * head_dim;
  int64_t level_start[kCudaMaxLevels];
  level_start_rows(spatial_shapes, problem.num_levels, level_start);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < padded_total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool active = index < total;
    const int64_t thread_index = active ? index : total - 1;  // inactive lanes compute zeros on a valid index
    const int64_t channel = thread_index % head_dim;
    const int64_t head = (thread_index / head_dim) % problem.num_heads;
    const int64_t batch_query = thread_index / row_stride;
    const int64_t batch_index = batch_query / problem.num_queries;
    const acc_t grad = active ? static_cast<acc_t>(grad_output[thread_index]) : acc_t(0);
    for (int64_t level = 0; level < problem.num_levels; ++level) {
      int64_t height, width;
      const bool level_ok = level_inside(spatial_shapes, level_start, level, problem.num_values, height, width);
      const int64_t level_offset =
          (batch_index * problem.num_values + level_start[level]) * row_stride + head * head_dim + channel;
      const int64_t first_sample = ((batch_query * problem.num_heads + head) * problem.num_levels + level) *
                                   problem.num_points;
      for (int64_t point = 0; point < problem.num_points; ++point) {
        const int64_t sample_index = first_sample + point;
        BilinearSample<acc_t> sample;
        const acc_t attention = static_cast<acc_t>(attention_weights[sample_index]);
        const bool inside = active && level_ok &&
                            bilinear_sample<acc_t>(static_cast<acc_t>(sampling_locations[2 * sample_index]),
                                                   static_cast<acc_t>(sampling_locations[2 * sample_index + 1]),
                                                   height, width, sample);
        acc_t d_sample = 0, d_loc_x = 0, d_loc_y = 0;
        if (inside) {
          acc_t corner_dot[4];
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            corner_dot[corner] = 0;
            if (sample.valid[corner]) {
              const int64_t offset = level_offset + sample.offset[corner] * row_stride;
              corner_dot[corner] = grad * static_cast<acc_t>(value[offset]);
              gpuAtomicAdd(grad_value + offset, attention * sample.weight[corner] * grad);
            }
          }
          sample_gradient<acc_t>(sample, corner_dot, height, width, d_sample, d_loc_x, d_loc_y);
        }
        if (segment > 0) {
          for (int offset = segment / 2; offset > 0; offset /= 2) {
            d_sample += __shfl_xor_sync(0xffffffffu, d_sample, offset);
            d_loc_x += __shfl_xor_sync(0xffffffffu, d_loc_x, offset);
            d_loc_y += __shfl_xor_sync(0xffffffffu, d_loc_y, offset);
          }
        }
        // After the reduction every lane of a segment holds the same sums; its first lane writes them.
        const bool writer = active && (segment == 0 || channel % segment == 0);
        if (writer) {
          if (segment > 0 && exclusive) {
            grad_attention_weights[sample_index] = d_sample;
            grad_sampling_locations[2 * sample_index] = attention * d_loc_x;
            grad_sampling_locations[2 * sample_index + 1] = attention * d_loc_y;
          } else if (d_sample != acc_t(0) || d_loc_x != acc_t(0) || d_loc_y != acc_t(0)) {
            gpuAtomicAdd(grad_attention_weights + sample_index, d_sample);
            gpuAtomicAdd(grad_sampling_locations + 2 * sample_index, attention * d_loc_x);
            gpuAtomicAdd(grad_sampling_locations + 2 * sample_index + 1, attention * d_loc_y);
          }
        }
      }
    }
  }
}

int64_t num_blocks(int64_t total) {
  const int64_t blocks = (total + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return blocks < 1 ? 1 : (blocks > (1LL << 30) ? (1LL << 30) : blocks);
}

template <typename scalar_t>
int forward_typed(const CudaProblem& problem, const void* value, const int64_t* spatial_shapes,
                  const void* sampling_locations, const void* attention_weights, void* output, cudaStream_t stream) {
  const int64_t total = problem.batch * problem.num_queries * problem.num_heads * problem.head_dim;
  if (total == 0) return 0;
  forward_kernel<scalar_t><<<num_blocks(total), kThreadsPerBlock, 0, stream>>>(
      problem, static_cast<const scalar_t*>(value), spatial_shapes, static_cast<const scalar_t*>(sampling_locations),
      static_cast<const scalar_t*>(attention_weights), static_cast<scalar_t*>(output));
  return static_cast<int>(cudaGetLastError());
}

template <typename scalar_t>
int backward_typed(const CudaProblem& problem, const void* value, const int64_t* spatial_shapes,
                   const void* sampling_locations, const void* attention_weights, const void* grad_output,
                   void* grad_value, void* grad_sampling_locations, void* grad_attention_weights,
                   cudaStream_t stream) {
  using acc_t = typename CudaAccType<scalar_t>::type;
  const int64_t total = problem.batch * problem.num_queries * problem.num_heads * problem.head_dim;
  if (total == 0) return 0;
  const int64_t head_dim = problem.head_dim;
  const bool power_of_two = head_dim > 0 && (head_dim & (head_dim - 1)) == 0;
  int segment = 0;
  if (head_dim <= kWarpSize && power_of_two) {
    segment = static_cast<int>(head_dim);
  } else if (head_dim % kWarpSize == 0) {
    segment = kWarpSize;
  }
  const bool exclusive = segment == head_dim;
  const int64_t padded_total = (total + kWarpSize - 1) / kWarpSize * kWarpSize;
  backward_kernel<scalar_t><<<num_blocks(padded_total), kThreadsPerBlock, 0, stream>>>(
      problem, static_cast<const scalar_t*>(value), spatial_shapes, static_cast<const scalar_t*>(sampling_locations),
      static_cast<const scalar_t*>(attention_weights), static_cast<const scalar_t*>(grad_output),
      static_cast<acc_t*>(grad_value), static_cast<acc_t*>(grad_sampling_locations),
      static_cast<acc_t*>(grad_attention_weights), segment, exclusive);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_ms_deform_attn_forward(CudaDtype dtype, const CudaProblem& problem, const void* value,
                                  const int64_t* spatial_shapes, const void* sampling_locations,
                                  const void* attention_weights, void* output, void* stream) {
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CudaDtype::kFloat32:
      return forward_typed<float>(problem, value, spatial_shapes, sampling_locations, attention_weights, output,
                                  cuda_stream);
    case CudaDtype::kFloat64:
      return forward_typed<double>(problem, value, spatial_shapes, sampling_locations, attention_weights, output,
                                   cuda_stream);
    case CudaDtype::kFloat16:
      return forward_typed<c10::Half>(problem, value, spatial_shapes, sampling_locations, attention_weights, output,
                                      cuda_stream);
    case CudaDtype::kBFloat16:
      return forward_typed<c10::BFloat16>(problem, value, spatial_shapes, sampling_locations, attention_weights,
                                          output, cuda_stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_ms_deform_attn_backward(CudaDtype dtype, const CudaProblem& problem, const void* value,
                                   const int64_t* spatial_shapes, const void* sampling_locations,
                                   const void* attention_weights, const void* grad_output, void* grad_value,
                                   void* grad_sampling_locations, void* grad_attention_weights, void* stream) {
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CudaDtype::kFloat32:
      return backward_typed<float>(problem, value, spatial_shapes, sampling_locations, attention_weights, grad_output,
                                   grad_value, grad_sampling_locations, grad_attention_weights, cuda_stream);
    case CudaDtype::kFloat64:
      return backward_typed<double>(problem, value, spatial_shapes, sampling_locations, attention_weights,
                                    grad_output, grad_value, grad_sampling_locations, grad_attention_weights,
                                    cuda_stream);
    case CudaDtype::kFloat16:
      return backward_typed<c10::Half>(problem, value, spatial_shapes, sampling_locations, attention_weights,
                                       grad_output, grad_value, grad_sampling_locations, grad_attention_weights,
                                       cuda_stream);
    case CudaDtype::kBFloat16:
      return backward_typed<c10::BFloat16>(problem, value, spatial_shapes, sampling_locations, attention_weights,
                                           grad_output, grad_value, grad_sampling_locations, grad_attention_weights,
                                           cuda_stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* cuda_error_name(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace msda
}  // namespace mask2former
