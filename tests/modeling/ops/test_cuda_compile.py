"""The CUDA kernels compile for sm_80 and sm_90, and their binding compiles with -DUSE_CUDA, without a CUDA torch.

The CPU-only torch of CI cannot build a CUDAExtension, so this compiles the kernel translation unit with nvcc
directly (it is torch-light on purpose) and syntax-checks the binding with g++. Skipped only where nvcc is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

CSRC = Path(__file__).resolve().parents[3] / "modeling" / "ops" / "csrc"


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not found")


def _our_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if str(CSRC) in line and "warning" in line]


def test_kernels_and_binding_compile(tmp_path):
    torch_includes = [f"-I{path}" for path in include_paths()]
    # The flags a CUDAExtension build gives nvcc: torch's common ones (no implicit half/bf16 conversions) + setup.py's.
    nvcc_command = [
        NVCC, "-c", str(CSRC / "cuda" / "ms_deform_attn_cuda.cu"), "-o", str(tmp_path / "kernels.o"),
        *COMMON_NVCC_FLAGS, "-O3", "-std=c++17", "-DUSE_CUDA", "-lineinfo", f"-I{CSRC}", *torch_includes,
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
    ]  # fmt: skip
    compiler = os.environ.get("CXX", "g++")
    binding_command = [
        compiler, "-fsyntax-only", "-std=c++20", "-DUSE_CUDA", "-Wall", f"-I{CSRC}", *torch_includes,
        f"-I{sysconfig.get_paths()['include']}", str(CSRC / "cuda" / "ms_deform_attn_cuda.cpp"),
    ]  # fmt: skip
    # Both at once: the two compilers are the slow part of the suite.
    nvcc = subprocess.Popen(nvcc_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    binding = subprocess.Popen(binding_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nvcc_out, nvcc_err = nvcc.communicate(timeout=600)
    binding_out, binding_err = binding.communicate(timeout=600)
    assert nvcc.returncode == 0, nvcc_out + nvcc_err
    assert binding.returncode == 0, binding_out + binding_err
    assert (tmp_path / "kernels.o").stat().st_size > 0
    assert _our_warnings(nvcc_err) == [], nvcc_err
    assert _our_warnings(binding_err) == [], binding_err
    # Both architectures' machine code is in the object (fatbin entries name them).
    contents = (tmp_path / "kernels.o").read_bytes()
    assert b"sm_80" in contents and b"sm_90" in contents
