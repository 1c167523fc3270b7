"""The compiler flags of regops._C, in one place: setup.py builds the
extension with them and benchmarks/static_cuda.py compiles the same CUDA
sources to cubins with them, so the static gate reads the code the build
makes. No torch import here: setup.py settles CUDA_HOME before torch loads.
"""

import os
import shutil
import site
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INCLUDE_DIRS = [os.path.join(ROOT, "csrc", "include")]
CUDA_SOURCE_GLOB = os.path.join("csrc", "cuda", "*.cu")
CUDA_DEFINES = [("REGOPS_WITH_CUDA", "1")]
# The architectures of a default build: the two the static gate checks, and
# PTX for anything newer.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# torch picks the C++ standard its headers need. -fno-math-errno: sqrtf
# setting errno is a side effect that keeps GCC from vectorizing loops
# that take square roots (the AdamW update); nothing here reads errno.
# -fno-wrapv undoes the -fwrapv of Python's own flags: with signed
# overflow defined, GCC cannot vectorize loops indexed by i + lane (the
# bfloat16 gradient norm among them); no code here relies on signed
# wrap-around (the sanitizer build checks for it).
# -g0 undoes the -g of Python's own flags: debug information for the ATen
# headers doubles the compile time of every translation unit (51 s -> 27 s
# of CPU for csrc/simt/dropout.cpp); the sanitizer build (setup.py) asks for
# the line tables of -g1 after it, for its stack traces.
# TORCH_ASSERT_ONLY_METHOD_OPERATORS: the sources include the slice of ATen
# they use (regops/aten.h), not <ATen/ATen.h>, a third of the compile time.
ATEN_DEFINE = "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-wrapv", "-g0", ATEN_DEFINE]
# The simulation's own flags (setup.py). -O2: the kernels run per simulated
# thread, between fiber switches that cost far more than what -O3 would add.
# -fno-fast-math is the default: float results stay the IEEE ones of the
# source.
SIM_CXX_FLAGS = ["-O2", "-fopenmp", "-fno-math-errno", "-g0", ATEN_DEFINE]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", ATEN_DEFINE]


def cuda_library_includes():
    """ATen's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit
    may lack; the nvidia-* wheels installed with torch carry them."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        for sub in ("cu13", "cu12", "cublas", "cusparse"):
            path = os.path.join(base, "nvidia", sub, "include")
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def find_cuda_home():
    """torch looks for nvcc on PATH; a stray /usr/local/bin/nvcc would make it
    guess /usr/local. Prefer an explicit CUDA_HOME, then the usual install.
    Call before importing torch, which reads CUDA_HOME once."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return
    nvcc = shutil.which("nvcc")
    if nvcc:
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
