// Operator schemas of multi-scale deformable attention (namespace `mask2former`) and the Python module entry.
//
// The kernels register themselves per device in cpu/ and cuda/ with TORCH_LIBRARY_IMPL; autograd and the fake
// (meta) kernels are registered from Python (modeling/ops/ms_deform_attn.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/ms_deform_attn_cpu.h"

TORCH_LIBRARY(mask2former, m) {
  // value (B, S, h, D), spatial_shapes (L, 2) int64 on value's device, sampling_locations (B, Q, h, L, P, 2),
  // attention_weights (B, Q, h, L, P) -> output (B, Q, h*D)
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  // -> (grad_value, grad_sampling_locations, grad_attention_weights), shaped like the inputs
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
  // Which instruction-set clone of the CPU kernels this machine runs ("avx512", "avx2" or "default").
  m.def("cpu_isa() -> str", [] { return std::string(mask2former::msda::cpu_kernel_isa()); });
}

// Importing `mask2former.modeling.ops._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mask2former deformable-attention ops", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
