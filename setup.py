"""Builds regops._C: the C++ CPU kernels always, the CUDA kernels whenever a
CUDA toolkit and a CUDA build of torch are present (REGOPS_CUDA=0 skips them).
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
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-wrapv"]
    link_flags = ["-fopenmp"]
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


setup(
    name="regops",
    packages=find_packages(include=["regops", "regops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
