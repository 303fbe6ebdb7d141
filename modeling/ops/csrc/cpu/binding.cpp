// CPU binding of multi-scale deformable attention: input and dtype checks, the problem description, result
// allocation, the split of work among threads, and the TORCH_LIBRARY_IMPL(CPU) registration.
//
// Forward: parallel over (batch, head, block of queries) items (forward.cpp); backward: parallel over (batch, head)
// tasks (backward.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cpu/ms_deform_attn_cpu.h"
#include "cpu/simd.h"
#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_common.h"

namespace mask2former {
namespace msda {

const char* cpu_kernel_isa() {
#if MSDA_HAVE_CLONES
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "default";
}

namespace {

Problem make_problem(const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& spatial_shapes,
                     std::vector<int64_t>& level_start) {
  Problem problem;
  problem.batch = value.size(0);
  problem.num_values = value.size(1);
  problem.num_heads = value.size(2);
  problem.head_dim = value.size(3);
  problem.num_queries = sampling_locations.size(1);
  problem.num_levels = sampling_locations.size(3);
  problem.num_points = sampling_locations.size(4);
  problem.value_batch_stride = value.stride(0);
  problem.value_row_stride = value.stride(1);
  problem.value_head_stride = value.stride(2);
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  // Dense (B, Q, h, L, P[, 2]) inputs (contiguous() callers); strides from the sizes, since contiguous() may keep
  // any stride on a size-1 dimension. The kernels gather a block's runs of L * P samples.
  TORCH_INTERNAL_ASSERT(sampling_locations.is_contiguous());
  problem.sample_head_stride = samples_per_head;
  problem.sample_query_stride = problem.num_heads * samples_per_head;
  problem.sample_batch_stride = problem.num_queries * problem.sample_query_stride;
  problem.spatial_shapes = spatial_shapes.data_ptr<int64_t>();
  level_start.resize(problem.num_levels);
  level_start_rows(problem.spatial_shapes, problem.num_levels, level_start.data());
  problem.level_start = level_start.data();
  return problem;
}

// Dense (B, S, h, D) value; the kernels copy one (batch, head) at a time, with a zero row appended, and index it
// with 32-bit offsets.
at::Tensor dense_value(const at::Tensor& value) {
  const int64_t num_values = value.size(1);
  TORCH_CHECK((num_values + 1) * value.size(3) < std::numeric_limits<int32_t>::max(), "ms_deform_attn (CPU): ",
              num_values, " value positions x ", value.size(3),
              " channels do not fit the kernel's 32-bit offsets; use fewer or smaller levels");
  return value.contiguous();
}

void check_cpu_dtype(const at::Tensor& value) {
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "ms_deform_attn (CPU): unsupported dtype ", dtype, " for value of shape ", value.sizes(),
              "; use float32, float64 or bfloat16");
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& sampling_locations_in,
                                      const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, sampling_locations_in, attention_weights_in);
  check_cpu_dtype(value_in);
  // Each thread copies the (batch, head) value rows it works on into a reused per-thread buffer (compact window,
  // no large allocation) and gathers each query block's locations and weights into small local buffers.
  const auto value = dense_value(value_in);
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  std::vector<int64_t> level_start;
  const Problem problem = make_problem(value, sampling_locations, spatial_shapes, level_start);
  // (B, Q, h * D)
  auto output = at::empty({problem.batch, problem.num_queries, problem.num_heads * problem.head_dim}, value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* value_data = value.data_ptr<scalar_t>();
    const scalar_t* location_data = sampling_locations.data_ptr<scalar_t>();
    const scalar_t* weight_data = attention_weights.data_ptr<scalar_t>();
    scalar_t* output_data = output.data_ptr<scalar_t>();
    const int64_t num_blocks = (problem.num_queries + kQueryBlock - 1) / kQueryBlock;
    at::parallel_for(0, problem.batch * problem.num_heads * num_blocks, 1, [&](int64_t begin, int64_t end) {
      forward_query_blocks(problem, value_data, location_data, weight_data, output_data, begin, end);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in, const at::Tensor& grad_output_in) {
  check_inputs(value_in, spatial_shapes_in, sampling_locations_in, attention_weights_in, &grad_output_in);
  check_cpu_dtype(value_in);
  // Per-(batch, head) value copies and per-block gathers as in the forward.
  const auto value = dense_value(value_in);
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const auto grad_output = grad_output_in.contiguous();
  std::vector<int64_t> level_start;
  const Problem problem = make_problem(value, sampling_locations, spatial_shapes, level_start);
  const int64_t num_tasks = problem.batch * problem.num_heads;
  const bool has_work = value.numel() > 0 && attention_weights.numel() > 0;
  // Every task writes all of its (b, head) slice of the three results (zeros included), so no zero fill is needed.
  auto allocate = [&](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return has_work ? at::empty(sizes, options) : at::zeros(sizes, options);
  };
  // (B, S, h, D)
  auto grad_value = allocate(value_in.sizes(), value_in.options());
  // The location and weight gradients are stored head-major, (h, B, Q, L, P[, 2]), and returned as
  // (B, Q, h, L, P[, 2]) views: each (batch, head) task then writes one contiguous run instead of a short run per
  // query, strided across cache lines shared with other heads. The fake kernel in ms_deform_attn.py
  // (`_cpu_head_major`) gives the same strides; tests/modeling/ops/test_ms_deform_attn.py checks that they agree.
  const auto locations_sizes = sampling_locations.sizes();
  auto grad_sampling_locations =
      allocate({locations_sizes[2], locations_sizes[0], locations_sizes[1], locations_sizes[3], locations_sizes[4], 2},
               sampling_locations.options())
          .permute({1, 2, 0, 3, 4, 5});
  const auto weights_sizes = attention_weights.sizes();
  auto grad_attention_weights =
      allocate({weights_sizes[2], weights_sizes[0], weights_sizes[1], weights_sizes[3], weights_sizes[4]},
               attention_weights.options())
          .permute({1, 2, 0, 3, 4});
  if (has_work) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      const scalar_t* value_data = value.data_ptr<scalar_t>();
      const scalar_t* location_data = sampling_locations.data_ptr<scalar_t>();
      const scalar_t* weight_data = attention_weights.data_ptr<scalar_t>();
      const scalar_t* grad_output_data = grad_output.data_ptr<scalar_t>();
      scalar_t* grad_value_data = grad_value.data_ptr<scalar_t>();
      scalar_t* grad_location_data = grad_sampling_locations.data_ptr<scalar_t>();
      scalar_t* grad_weight_data = grad_attention_weights.data_ptr<scalar_t>();
      at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          backward_head_task(problem, value_data, location_data, weight_data, grad_output_data, grad_value_data,
                             grad_location_data, grad_weight_data, task);
        }
      });
    });
  }
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mask2former, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace msda
}  // namespace mask2former
