"""Builds regops._C: the C++ CPU kernels always, the CUDA kernels whenever a
CUDA toolkit and a CUDA build of torch are present (REGOPS_CUDA=0 skips them);
and regops._C_cuda_sim: the same CUDA kernel sources compiled by the host
compiler against the SIMT execution layer (csrc/simt/), which runs them on CPU
tensors (REGOPS_CUDA_SIM=1). REGOPS_CUDA_SIM_BUILD=0 leaves the simulation out.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))  # csrc/build_flags.py

import build_flags  # noqa: E402

build_flags.find_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    if os.environ.get("REGOPS_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sanitize_flags():
    """tests/sanitize.sh (make sanitize): compile and link flags. Linking with
    the flags too makes the libraries depend on the UBSan runtime, whose
    handlers they call."""
    if not os.environ.get("REGOPS_SANITIZE"):
        return [], []
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    return sanitize + ["-fno-omit-frame-pointer", "-O1", "-g1"], sanitize


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = list(build_flags.INCLUDE_DIRS)
    sanitize_compile, sanitize_link = _sanitize_flags()
    cxx_flags = list(build_flags.CXX_FLAGS) + sanitize_compile
    link_flags = list(build_flags.LINK_FLAGS) + sanitize_link
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


def _simulation_extension():
    """csrc/cuda/*.cu through the wrappers of csrc/simt/ (each includes one
    .cu file) plus the SIMT runtime, by the host compiler, with
    build_flags.SIM_CXX_FLAGS."""
    sanitize_compile, sanitize_link = _sanitize_flags()
    return cpp_extension.CppExtension(
        "regops._C_cuda_sim", sorted(glob.glob(os.path.join("csrc", "simt", "*.cpp"))),
        include_dirs=list(build_flags.INCLUDE_DIRS),
        define_macros=[("REGOPS_CUDA_SIM", "1")],
        extra_compile_args={"cxx": list(build_flags.SIM_CXX_FLAGS) + sanitize_compile},
        extra_link_args=["-fopenmp"] + sanitize_link,
    )


def _extensions():
    """REGOPS_NO_EXTENSIONS=1: none, for `make build`'s editable install of
    the package metadata after `setup.py build_ext --inplace` has built the
    extensions in the tree (whose objects, kept in build/temp.*, make the
    next build incremental and serve the static gate)."""
    if os.environ.get("REGOPS_NO_EXTENSIONS") == "1":
        return []
    if os.environ.get("REGOPS_CUDA_SIM_BUILD", "1") == "0":
        return [_extension()]
    return [_extension(), _simulation_extension()]


setup(
    name="regops",
    packages=find_packages(include=["regops", "regops.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
