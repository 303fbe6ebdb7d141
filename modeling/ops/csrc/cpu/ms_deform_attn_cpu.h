// CPU kernels of multi-scale deformable attention (registered with TORCH_LIBRARY_IMPL in the .cpp).
#pragma once

namespace mask2former {
namespace msda {

// The instruction-set clone the CPU kernels dispatch to on this machine: "avx512", "avx2" or "default".
const char* cpu_kernel_isa();

}  // namespace msda
}  // namespace mask2former
