"""Builds regops._C: the C++ CPU kernels always, the CUDA kernels whenever a
CUDA toolkit and a CUDA build of torch are present (REGOPS_CUDA=0 skips them).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_flags.py, next to this file

import build_flags  # noqa: E402

build_flags.find_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    if os.environ.get("REGOPS_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = list(build_flags.INCLUDE_DIRS)
    cxx_flags = list(build_flags.CXX_FLAGS)
    link_flags = list(build_flags.LINK_FLAGS)
    if os.environ.get("REGOPS_SANITIZE"):
        # tests/sanitize.sh (make sanitize). Linking with the flags too makes
        # the library depend on the UBSan runtime, whose handlers it calls.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx_flags += sanitize + ["-fno-omit-frame-pointer", "-O1", "-g"]
        link_flags += sanitize
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "regops._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_flags.DEFAULT_CUDA_ARCH_LIST)
    cuda_sources = sorted(glob.glob(build_flags.CUDA_SOURCE_GLOB))
    return cpp_extension.CUDAExtension(
        "regops._C", cpu_sources + cuda_sources,
        include_dirs=include_dirs + build_flags.cuda_library_includes(),
        define_macros=list(build_flags.CUDA_DEFINES),
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": list(build_flags.NVCC_FLAGS),
        },
        extra_link_args=link_flags,
    )


setup(
    name="regops",
    packages=find_packages(include=["regops", "regops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
