// Input validation shared by the CPU and CUDA bindings: every message names the offending shapes.
#pragma once

#include <ATen/ATen.h>

namespace mask2former {
namespace msda {

// Checks shapes, dtypes and devices of the forward inputs (and of grad_output when given).
inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights, const at::Tensor* grad_output = nullptr) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (batch, num_values, num_heads, head_dim), got shape ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (batch, num_queries, num_heads, num_levels, num_points, 2), "
              "got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (batch, num_queries, num_heads, num_levels, num_points), "
              "got shape ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (num_levels, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  const int64_t batch = value.size(0);
  const int64_t num_heads = value.size(2);
  TORCH_CHECK(sampling_locations.size(0) == batch && sampling_locations.size(2) == num_heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value (batch, num_values, num_heads, head_dim) = ", value.sizes(),
              " in batch or num_heads");
  TORCH_CHECK(sampling_locations.size(3) == spatial_shapes.size(0), "ms_deform_attn: sampling_locations ",
              sampling_locations.sizes(), " has ", sampling_locations.size(3), " levels but spatial_shapes ",
              spatial_shapes.sizes(), " has ", spatial_shapes.size(0));
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), "ms_deform_attn: attention_weights ",
              attention_weights.sizes(), " must be sampling_locations ", sampling_locations.sizes(),
              " without its last dimension");
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  TORCH_CHECK(value.device() == sampling_locations.device() && value.device() == attention_weights.device() &&
                  value.device() == spatial_shapes.device(),
              "ms_deform_attn: all inputs must be on one device, got value on ", value.device(),
              ", spatial_shapes on ", spatial_shapes.device(), ", sampling_locations on ", sampling_locations.device(),
              ", attention_weights on ", attention_weights.device());
  if (spatial_shapes.device().is_cpu()) {
    // On a GPU this would be a host sync; the CUDA kernel instead treats rows past num_values as outside the map.
    const auto shapes = spatial_shapes.contiguous();
    const int64_t* data = shapes.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t level = 0; level < shapes.size(0); ++level) {
      TORCH_CHECK(data[2 * level] > 0 && data[2 * level + 1] > 0, "ms_deform_attn: spatial_shapes ",
                  shapes.sizes(), " has a non-positive size at level ", level);
      total += data[2 * level] * data[2 * level + 1];
    }
    TORCH_CHECK(total == value.size(1), "ms_deform_attn: spatial_shapes ", shapes.sizes(),
                " sum to H*W = ", total, " rows but value ", value.sizes(), " has num_values = ", value.size(1));
  }
  if (grad_output != nullptr) {
    const int64_t expected[3] = {batch, sampling_locations.size(1), num_heads * value.size(3)};
    TORCH_CHECK(grad_output->sizes() == at::IntArrayRef(expected), "ms_deform_attn: grad_output ",
                grad_output->sizes(), " must be (batch, num_queries, num_heads * head_dim) = ",
                at::IntArrayRef(expected));
    TORCH_CHECK(grad_output->scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output dtype ",
                grad_output->scalar_type(), " differs from value dtype ", value.scalar_type());
  }
}

}  // namespace msda
}  // namespace mask2former
