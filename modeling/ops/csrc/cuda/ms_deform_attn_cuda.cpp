// CUDA binding of multi-scale deformable attention: checks, allocation, device guard and current stream (both
// through torch's C shim), then the launchers of ms_deform_attn_cuda.cu. Compiled only with -DUSE_CUDA.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/library.h>

#include "cuda/ms_deform_attn_cuda.h"
#include "ms_deform_attn_checks.h"

namespace mask2former {
namespace msda {
namespace {

// RAII device guard over the shim's CUDAGuard.
class ShimCudaGuard {
 public:
  explicit ShimCudaGuard(int32_t device_index) {
    TORCH_CHECK(aoti_torch_create_cuda_guard(device_index, &handle_) == AOTI_TORCH_SUCCESS,
                "ms_deform_attn: could not set CUDA device ", device_index);
  }
  ~ShimCudaGuard() { aoti_torch_delete_cuda_guard(handle_); }
  ShimCudaGuard(const ShimCudaGuard&) = delete;
  ShimCudaGuard& operator=(const ShimCudaGuard&) = delete;

 private:
  CUDAGuardHandle handle_ = nullptr;
};

void* current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
              "ms_deform_attn: could not get the current CUDA stream of device ", device_index);
  return stream;
}

CudaDtype cuda_dtype(const at::Tensor& value) {
  switch (value.scalar_type()) {
    case at::kFloat:
      return CudaDtype::kFloat32;
    case at::kDouble:
      return CudaDtype::kFloat64;
    case at::kHalf:
      return CudaDtype::kFloat16;
    case at::kBFloat16:
      return CudaDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "ms_deform_attn (CUDA): unsupported dtype ", value.scalar_type(), " for value of shape ",
                  value.sizes(), "; use float32, float64, float16 or bfloat16");
  }
}

CudaProblem make_problem(const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(sampling_locations.size(3) <= kCudaMaxLevels, "ms_deform_attn (CUDA): sampling_locations ",
              sampling_locations.sizes(), " has ", sampling_locations.size(3), " levels; the CUDA kernels take at most ",
              kCudaMaxLevels, " (raise kCudaMaxLevels in cuda/ms_deform_attn_cuda.h, or run the reference with ",
              "use_backend(\"reference\"))");
  return CudaProblem{value.size(0), value.size(1), value.size(2), value.size(3),
                     sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

void check_launch(int error, const char* what, const at::Tensor& value, const at::Tensor& sampling_locations) {
  TORCH_CHECK(error == 0, "ms_deform_attn: CUDA ", what, " launch failed (", cuda_error_name(error),
              ") for value ", value.sizes(), " and sampling_locations ", sampling_locations.sizes());
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                       const at::Tensor& sampling_locations_in,
                                       const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, sampling_locations_in, attention_weights_in);
  const CudaDtype dtype = cuda_dtype(value_in);
  const int32_t device_index = static_cast<int32_t>(value_in.get_device());
  ShimCudaGuard guard(device_index);
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const CudaProblem problem = make_problem(value, sampling_locations);
  // (B, Q, h * D)
  auto output = at::empty({problem.batch, problem.num_queries, problem.num_heads * problem.head_dim}, value.options());
  const int error = launch_ms_deform_attn_forward(dtype, problem, value.data_ptr(), spatial_shapes.data_ptr<int64_t>(),
                                                  sampling_locations.data_ptr(), attention_weights.data_ptr(),
                                                  output.data_ptr(), current_stream(device_index));
  check_launch(error, "forward", value, sampling_locations);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in, const at::Tensor& grad_output_in) {
  check_inputs(value_in, spatial_shapes_in, sampling_locations_in, attention_weights_in, &grad_output_in);
  const CudaDtype dtype = cuda_dtype(value_in);
  const int32_t device_index = static_cast<int32_t>(value_in.get_device());
  ShimCudaGuard guard(device_index);
  const auto value = value_in.contiguous();
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto sampling_locations = sampling_locations_in.contiguous();
  const auto attention_weights = attention_weights_in.contiguous();
  const auto grad_output = grad_output_in.contiguous();
  const CudaProblem problem = make_problem(value, sampling_locations);
  // Gradients accumulate in fp32 (fp64 for fp64 inputs) and are cast back at the end.
  const auto acc_options = value.options().dtype(value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto grad_value = at::zeros(value.sizes(), acc_options);
  auto grad_sampling_locations = at::zeros(sampling_locations.sizes(), acc_options);
  auto grad_attention_weights = at::zeros(attention_weights.sizes(), acc_options);
  const int error = launch_ms_deform_attn_backward(
      dtype, problem, value.data_ptr(), spatial_shapes.data_ptr<int64_t>(), sampling_locations.data_ptr(),
      attention_weights.data_ptr(), grad_output.data_ptr(), grad_value.data_ptr(), grad_sampling_locations.data_ptr(),
      grad_attention_weights.data_ptr(), current_stream(device_index));
  check_launch(error, "backward", value, sampling_locations);
  return {grad_value.to(value.scalar_type()), grad_sampling_locations.to(value.scalar_type()),
          grad_attention_weights.to(value.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mask2former, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace msda
}  // namespace mask2former
