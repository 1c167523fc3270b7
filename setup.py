"""Builds regops._C: the C++ CPU kernels always, the CUDA kernels whenever a
CUDA toolkit and a CUDA build of torch are present (REGOPS_CUDA=0 skips them);
and, always, regops._C_cuda_sim: the same CUDA kernel sources compiled by the
host compiler against the SIMT execution layer (csrc/simt/), which runs them on
CPU tensors (REGOPS_CUDA_SIM=1).
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch looks for nvcc on PATH; a stray /usr/local/bin/nvcc would make it
    guess /usr/local. Prefer an explicit CUDA_HOME, then the usual install."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return
    nvcc = shutil.which("nvcc")
    if nvcc:
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


_find_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    if os.environ.get("REGOPS_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_library_includes():
    """ATen's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit
    may lack; the nvidia-* wheels installed with torch carry them."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        for sub in ("cu13", "cu12", "cublas", "cusparse"):
            path = os.path.join(base, "nvidia", sub, "include")
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _sanitize_flags():
    """tests/sanitize.sh (make sanitize): compile and link flags. Linking with
    the flags too makes the libraries depend on the UBSan runtime, whose
    handlers they call."""
    if not os.environ.get("REGOPS_SANITIZE"):
        return [], []
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    return sanitize + ["-fno-omit-frame-pointer", "-O1", "-g"], sanitize


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # torch picks the C++ standard its headers need. -fno-math-errno: sqrtf
    # setting errno is a side effect that keeps GCC from vectorizing loops
    # that take square roots (the AdamW update); nothing here reads errno.
    # -fno-wrapv undoes the -fwrapv of Python's own flags: with signed
    # overflow defined, GCC cannot vectorize loops indexed by i + lane (the
    # bfloat16 gradient norm ran 3.5x slower); no code here relies on signed
    # wrap-around (the sanitizer build checks for it).
    sanitize_compile, sanitize_link = _sanitize_flags()
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-wrapv"] + sanitize_compile
    link_flags = ["-fopenmp"] + sanitize_link
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "regops._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return cpp_extension.CUDAExtension(
        "regops._C", cpu_sources + cuda_sources,
        include_dirs=include_dirs + _cuda_library_includes(),
        define_macros=[("REGOPS_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=link_flags,
    )


def _simulation_extension():
    """csrc/cuda/*.cu through the wrappers of csrc/simt/ (each includes one
    .cu file) plus the SIMT runtime, by the host compiler. -O2: the kernels
    run per simulated thread, between fiber switches that cost far more than
    what -O3 would add. -fno-fast-math is the default: float results stay
    the IEEE ones of the source."""
    sanitize_compile, sanitize_link = _sanitize_flags()
    return cpp_extension.CppExtension(
        "regops._C_cuda_sim", sorted(glob.glob(os.path.join("csrc", "simt", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=[("REGOPS_CUDA_SIM", "1")],
        extra_compile_args={"cxx": ["-O2", "-fopenmp", "-fno-math-errno"] + sanitize_compile},
        extra_link_args=["-fopenmp"] + sanitize_link,
    )


setup(
    name="regops",
    packages=find_packages(include=["regops", "regops.*"]),
    ext_modules=[_extension(), _simulation_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
