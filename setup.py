"""Builds the one extension ssm_ext._C: C++ CPU sources always, CUDA sources when torch
has CUDA and nvcc is found."""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# 8.0 A100, 8.7 Jetson Orin, 8.9 Ada, 9.0 Hopper (+PTX so newer GPUs JIT it).
DEFAULT_ARCH_LIST = "8.0;8.6;8.7;8.9;9.0+PTX"


def cuda_available_for_build():
    if os.environ.get("SSM_EXT_FORCE_CPU", "0") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)


def extension():
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cxx_flags = ["-O3", "-std=c++17"]
    if not cuda_available_for_build():
        return CppExtension("ssm_ext._C", cpp, extra_compile_args={"cxx": cxx_flags},
                            include_dirs=[os.path.join(ROOT, "csrc")])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
                  "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return CUDAExtension("ssm_ext._C", cpp + cu,
                         extra_compile_args={"cxx": cxx_flags + ["-DSSM_EXT_WITH_CUDA"],
                                             "nvcc": nvcc_flags + ["-DSSM_EXT_WITH_CUDA"]},
                         include_dirs=[os.path.join(ROOT, "csrc")])


setup(
    name="ssm_ext",
    version="0.1.0",
    packages=find_packages(include=["ssm_ext", "ssm_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
