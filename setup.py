"""Builds bv_blend_ext._C: a CUDAExtension when nvcc and a CUDA-enabled torch are present (a GPU
is not needed to compile), a CppExtension otherwise. BV_BLEND_CUDA=0/1 forces the choice."""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def want_cuda() -> bool:
    forced = os.environ.get("BV_BLEND_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragmas only take effect in a
    # translation unit compiled with OpenMP; without it the CPU kernels would run on one thread.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if want_cuda():
        return CUDAExtension(
            "bv_blend_ext._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension("bv_blend_ext._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


setup(
    name="bv-blend-ext",
    version="0.1.0",
    description="BV-Blend advantage estimation for GRPO as a fused PyTorch C++/CUDA op, with a GRPO trainer and a TRL drop-in",
    packages=find_packages(include=["bv_blend_ext", "bv_blend_ext.*"])
    + find_packages("python", include=["bv_blend", "bv_blend.*"]),
    package_dir={"bv_blend": "python/bv_blend"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "train": ["transformers>=4.56", "tokenizers", "tqdm", "matplotlib", "pyyaml",
                  "tensorboard"],
        "trl": ["trl>=1.16,<1.17", "accelerate", "datasets"],
        # verl does not declare cachetools, fastapi and uvicorn, which its PPO trainer imports.
        "verl": ["verl>=0.9.1,<0.10", "cachetools", "fastapi", "uvicorn"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11",
                "transformers>=4.56", "tokenizers", "datasets", "tqdm", "matplotlib", "pyyaml",
                "tensorboard", "trl>=1.16,<1.17", "accelerate"],
    },
    entry_points={"console_scripts": ["bv-blend = bv_blend.cli:main"],
                  # `import verl` imports every verl.plugins entry point: this registers the
                  # `bv_blend` advantage estimator (algorithm.adv_estimator=bv_blend).
                  "verl.plugins": ["bv_blend = bv_blend.verl"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
