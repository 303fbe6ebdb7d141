"""Builds the optional deformable-attention extension; metadata lives in pyproject.toml.

`mask2former.modeling.ops._C` holds the op schemas and the CPU kernels (C++, OpenMP; no -march flags: the kernels
carry their own AVX2/AVX-512 clones), plus the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found,
or when FORCE_CUDA=1. An install without a working compiler still succeeds, with one warning: the package then
runs the pure-PyTorch reference. MASK2FORMER_NO_EXTENSION=1 skips the build.
"""

import glob
import os
import warnings

from setuptools import setup

OPS_DIR = "modeling/ops"
EXTENSION_NAME = "mask2former.modeling.ops._C"
FALLBACK_NOTE = (
    "mask2former will run the pure-PyTorch (grid_sample) deformable attention instead: correct, but about 20-40x "
    "slower on CPU. Install a C++ compiler (and a CUDA toolkit for GPUs) and reinstall with "
    "`pip install --no-build-isolation -e .` to get the compiled op."
)


def _warn_fallback(reason: str) -> None:
    message = f"mask2former: the C++/CUDA deformable-attention extension was not built ({reason}). {FALLBACK_NOTE}"
    warnings.warn(message, stacklevel=1)


def _use_cuda(torch_module) -> bool:
    """CUDA kernels when a toolkit is found and torch is a CUDA build (or FORCE_CUDA=1, e.g. no GPU visible)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:  # CUDAExtension itself would fail: build the CPU kernels only, and say why
        if os.environ.get("FORCE_CUDA") == "1":
            warnings.warn("mask2former: FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on "
                          "PATH); building the CPU kernels only", stacklevel=1)  # fmt: skip
        return False
    return os.environ.get("FORCE_CUDA") == "1" or torch_module.version.cuda is not None


def _extensions():
    sources = sorted(glob.glob(f"{OPS_DIR}/csrc/*.cpp") + glob.glob(f"{OPS_DIR}/csrc/cpu/*.cpp"))
    if not sources or os.environ.get("MASK2FORMER_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch missing from the build environment: install on the reference path
        _warn_fallback("torch is not importable at build time; use `pip install --no-build-isolation`")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """build_ext whose failure leaves the package installed (on the reference path) with one warning."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # noqa: BLE001  any compiler or toolkit failure
                _warn_fallback(f"{type(error).__name__}: {error}")
                self.extensions = []  # nothing to copy into the source tree or the wheel

        def copy_extensions_to_source(self):
            if self.extensions:
                super().copy_extensions_to_source()

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    compile_args = {"cxx": ["-O3", "-fopenmp", "-std=c++20"]}
    include_dirs = [os.path.abspath(f"{OPS_DIR}/csrc")]
    if _use_cuda(torch):
        cuda_sources = sorted(glob.glob(f"{OPS_DIR}/csrc/cuda/*.cu") + glob.glob(f"{OPS_DIR}/csrc/cuda/*.cpp"))
        compile_args["cxx"].append("-DUSE_CUDA")
        compile_args["nvcc"] = ["-O3", "-std=c++17", "-DUSE_CUDA", "-lineinfo"]
        extension = CUDAExtension(
            EXTENSION_NAME,
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            EXTENSION_NAME,
            sources,
            include_dirs=include_dirs,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
