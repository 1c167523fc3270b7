"""What every CUDA kernel costs, read without a GPU: the static CUDA gate.

Each csrc/cuda/*.cu is compiled once, with the flags of the real build
(csrc/build_flags.py, which setup.py uses too, plus the flags torch's
BuildExtension adds), to one fatbin holding an sm_80 and an sm_90 cubin; or,
when `make build` has just compiled it, the build's own object is read.
`cuobjdump -res-usage` gives each kernel's registers, shared memory, stack
and local memory; `cuobjdump -sass` gives its instructions. rows() returns
one row per (kernel instantiation, arch):

  kernel, variant       the function and its template arguments (demangled)
  arch                  sm_80 or sm_90
  registers, shared_bytes, local_bytes (local memory + stack: spills)
  widest_load_bits, widest_store_bits
                        the widest global access in the SASS: LDG/STG and
                        the generic LD/ST (pointers the compiler cannot
                        prove global, e.g. read from a table); .128 = 128
  generic_128           whether a 128-bit access is generic (LD.E.128)
  instructions_per_element
                        SASS instructions of the main loop per element (see
                        below); None where no loop streams elements
  problems              strings; empty means the kernel passes

The main loop, best effort: the backward branches of the SASS delimit the
loops (the range [target, branch]); the main loop is the innermost loop that
holds the kernel's widest global load. It handles
  elements = (number of widest loads in it) * width / (element bits * inputs)
elements per iteration, where the element type is the first floating-point
type among the template arguments and `inputs` is how many element arrays
the kernel reads per element (KERNELS below). Instructions are counted over
the whole address range of the loop, so a scalar fallback that the compiler
places inside that range counts too: the figure is an upper bound, good for
comparing versions of one kernel, not kernels of different shapes.

Problems: local memory or stack (a spill), LDL/STL in the SASS, a kernel
that KERNELS says is vectorized without a 128-bit global load (and store,
where it writes elements), a compile failure, and a __global__ function of
the sources that KERNELS does not classify (so a new kernel cannot slip past
the gate).

  python benchmarks/static_cuda.py     # prints the rows as a table
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "csrc") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "csrc"))  # csrc/build_flags.py

import build_flags  # noqa: E402

ARCHS = ("sm_80", "sm_90")
CACHE_DIR = os.path.join(ROOT, "build", "static_cuda")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What the gate expects of one kernel function."""
    vector_load: bool   # reads its elements as 16-byte vectors where aligned
    vector_store: bool  # writes its elements as 16-byte vectors where aligned
    inputs: int = 1     # element arrays read per element (for instructions_per_element)
    why: str = ""       # for a scalar kernel: why it needs no vectors
    # For kernels templated on <kVec, Op>: the vector expectations hold for
    # kVec > 1 only (kVec == 1 is the scalar path of rows that are not a
    # whole number of vectors), and the inputs are the Op's.
    vector_template: bool = False
    # A kernel without a loop (each thread handles a fixed number of vectors):
    # instructions per element over the whole kernel.
    straight_line: bool = False


# Element arrays read per element by each batch-norm Op (csrc/cuda/batch_norm.cu),
# by its residual flag where it has one.
_OP_INPUTS = {"NormalizeOp": (1, 2), "GradInputOp": (2, 2), "StatisticsOp": (1, 1), "GradientSumsOp": (2, 3)}


def _template_vector_width(variant: str) -> int | None:
    match = re.match(r"\s*(\d+)\s*,", variant)
    return int(match.group(1)) if match else None


def expects_vectors(family: str, variant: str) -> bool:
    """Whether the vector expectations of KERNELS apply to this instantiation."""
    spec = KERNELS.get(family)
    return spec is not None and (not spec.vector_template or (_template_vector_width(variant) or 1) > 1)


def _op_inputs(variant: str) -> int:
    if "Op<" not in variant:  # <kVec, scalar_t, acc_t, kResidual> (the one-pass forward: x, and z with a residual)
        return 2 if variant.rstrip().endswith("true") else 1
    for op, (plain, residual) in _OP_INPUTS.items():
        if op in variant:
            return residual if re.search(op + r"<[^>]*,\s*true\s*>", variant) else plain
    return 1


# Every __global__ function of csrc/cuda/*.cu. A kernel missing here is a
# problem: decide whether it must vectorize before it ships.
KERNELS = {
    "dropout_forward_kernel": KernelSpec(True, True),
    "dropout_backward_kernel": KernelSpec(True, True),
    "philox_kernel": KernelSpec(False, False, why="test-only known-answer op"),
    "elementwise_rows_kernel": KernelSpec(True, True, vector_template=True),
    "elementwise_channels_kernel": KernelSpec(True, True, vector_template=True),
    "reduce_rows_kernel": KernelSpec(True, False, vector_template=True),
    "reduce_channels_kernel": KernelSpec(True, False, vector_template=True),
    "one_pass_rows_kernel": KernelSpec(True, True, vector_template=True, straight_line=True),
    "one_pass_channels_kernel": KernelSpec(True, True, vector_template=True, straight_line=True),
    "finalize_statistics_kernel": KernelSpec(False, False, why="a thread per channel"),
    "affine_coefficients_kernel": KernelSpec(False, False, why="a thread per channel"),
    "finalize_gradients_kernel": KernelSpec(False, False, why="a thread per channel"),
    "multi_tensor_apply_kernel": KernelSpec(True, True),  # inputs: kLists, read from the variant
    "sum_of_squares_kernel": KernelSpec(True, False),
    "finish_norm_kernel": KernelSpec(False, False, why="one block sums the partials"),
    "increment_steps_kernel": KernelSpec(False, False, why="one float per tensor"),
    "layer_norm_mask_kernel": KernelSpec(False, False, why="writes one mask byte per thread, reads no elements"),
    "layer_norm_forward_kernel": KernelSpec(True, True, inputs=2),
    "layer_norm_backward_kernel": KernelSpec(True, True, inputs=2),
    "layer_norm_reduce_partials_kernel": KernelSpec(False, False, why="a thread per column sums the slot partials"),
}

_ELEMENT_BITS = {"double": 64, "float": 32, "c10::Half": 16, "c10::BFloat16": 16}


# ---- tools ----------------------------------------------------------------------------

def _cuda_home() -> str | None:
    build_flags.find_cuda_home()
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def find_tool(name: str) -> str | None:
    """nvcc from CUDA_HOME; cuobjdump from CUDA_HOME, PATH, or the copy that
    Triton ships (a bare toolkit may lack it)."""
    home = _cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    if name == "cuobjdump":
        try:
            import triton

            path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
            if os.path.exists(path):
                return path
        except ImportError:
            pass
    return None


def missing_tools() -> list[str]:
    """The tools the gate needs and cannot find (empty: it can run)."""
    missing = [t for t in ("nvcc", "cuobjdump") if find_tool(t) is None]
    if shutil.which("c++filt") is None:
        missing.append("c++filt")
    return missing


@functools.lru_cache(maxsize=None)
def nvcc_flags() -> tuple[str, ...]:
    """Device-side flags of the real build: setup.py's (build_flags) and the
    ones torch's BuildExtension adds to every nvcc command."""
    build_flags.find_cuda_home()
    from torch.utils import cpp_extension

    flags = list(cpp_extension.COMMON_NVCC_FLAGS) + list(build_flags.NVCC_FLAGS) + ["-std=c++20"]
    flags += [f"-D{name}={value}" for name, value in build_flags.CUDA_DEFINES]
    flags += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    includes = build_flags.INCLUDE_DIRS + build_flags.cuda_library_includes() + cpp_extension.include_paths("cuda")
    flags += [f"-I{d}" for d in includes]
    # -lineinfo and --expt-relaxed-constexpr may appear twice; nvcc accepts it.
    return tuple(flags)


def sources(only: str | None = None) -> list[str]:
    """csrc/cuda/*.cu, or only csrc/cuda/ONLY.cu."""
    found = sorted(glob.glob(os.path.join(ROOT, build_flags.CUDA_SOURCE_GLOB)))
    return [s for s in found if only is None or os.path.splitext(os.path.basename(s))[0] == only]


def _source_digest(source: str, command: list[str]) -> str:
    """Hash of the command and of every regops source the file can include."""
    digest = hashlib.sha256(" ".join(command).encode())
    for path in [source] + sorted(glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                digest.update(path.encode() + handle.read())
    return digest.hexdigest()[:16]


def _regops_inputs(source: str) -> list[str]:
    """The files of this tree a compile of ``source`` depends on."""
    paths = [source, os.path.join(ROOT, "setup.py"), os.path.join(ROOT, "csrc", "build_flags.py")]
    return paths + glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*"), recursive=True)


def build_object(source: str, archs=ARCHS) -> str | None:
    """The object file the extension build made of ``source``, when it can
    stand for the gate's own compile: `make build` (setup.py build_ext
    --inplace) keeps it under build/temp.*/, compiled with the same flags; it
    must be newer than every regops file the compile reads and hold SASS for
    every arch of the gate (TORCH_CUDA_ARCH_LIST may have chosen others).
    None otherwise."""
    stem = os.path.splitext(os.path.basename(source))[0]
    candidates = glob.glob(os.path.join(ROOT, "build", "temp.*", "csrc", "cuda", f"{stem}.o"))
    if len(candidates) != 1:
        return None
    obj = candidates[0]
    if os.path.getmtime(obj) < max(os.path.getmtime(p) for p in _regops_inputs(source) if os.path.isfile(p)):
        return None
    listing = subprocess.run([find_tool("cuobjdump"), "-lelf", obj], capture_output=True, text=True)
    if listing.returncode != 0 or any(f".{arch}." not in listing.stdout for arch in archs):
        return None
    return obj


def compile_fatbin(source: str, archs=ARCHS) -> str:
    """The device code of ``source`` for every arch: the extension build's
    object when it is current (build_object), else one nvcc call per source,
    cached under build/static_cuda by the hash of the command and the
    sources."""
    obj = build_object(source, archs)
    if obj is not None:
        return obj
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    command = [find_tool("nvcc"), "-fatbin", *nvcc_flags(), *gencode, source]
    os.makedirs(CACHE_DIR, exist_ok=True)
    stem = os.path.splitext(os.path.basename(source))[0]
    out = os.path.join(CACHE_DIR, f"{stem}-{_source_digest(source, command)}.fatbin")
    if not os.path.exists(out):
        result = subprocess.run(command + ["-o", out + ".tmp"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {os.path.relpath(source, ROOT)}:\n{result.stderr[:4000]}")
        os.replace(out + ".tmp", out)
        for stale in glob.glob(os.path.join(CACHE_DIR, f"{stem}-*.fatbin")):
            if stale != out:
                os.remove(stale)
    return out


# ---- parsing ------------------------------------------------------------------------------

def demangle(names: list[str]) -> dict[str, str]:
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines()))


def _split_sections(text: str, header: re.Pattern) -> dict[str, str]:
    """Text after each 'arch = sm_XX' / 'code for sm_XX' header, by arch."""
    parts = {}
    matches = list(header.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        parts[match.group(1)] = parts.get(match.group(1), "") + text[match.end():end]
    return parts


def parse_resource_usage(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {mangled name: {REG, STACK, SHARED, LOCAL, ...}}}."""
    usage = {}
    for arch, section in _split_sections(text, re.compile(r"arch = (sm_\d+)")).items():
        functions = usage.setdefault(arch, {})
        for match in re.finditer(r"Function (\S+):\s*\n\s*(.*)", section):
            functions[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", match.group(2))}
    return usage


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_sass(text: str) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """{arch: {mangled name: [(address, instruction text)]}}."""
    sass = {}
    for arch, section in _split_sections(text, re.compile(r"code for (sm_\d+)")).items():
        functions = sass.setdefault(arch, {})
        for match in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*(?:Function : |\.{5,}|$))", section, re.S):
            functions[match.group(1)] = [(int(a, 16), ins.strip()) for a, ins in _INSTRUCTION.findall(match.group(2))]
    return sass


_MEMORY = re.compile(r"^(?:@!?U?P\w+\s+)?(LDG|STG|LD|ST|LDL|STL)(\.[\w.]+)?\s")


def access_bits(instruction: str) -> tuple[str, int] | None:
    """('load' | 'store' | 'local', bits) of a global or generic memory
    instruction, else None. Widths: .128/.64 suffixes, .U8/.S8 8, .U16/.S16 16,
    none 32."""
    match = _MEMORY.match(instruction)
    if match is None:
        return None
    op, suffix = match.group(1), (match.group(2) or "")
    if op in ("LDL", "STL"):
        return "local", 0
    bits = 32
    for token, width in ((".128", 128), (".64", 64), (".U8", 8), (".S8", 8), (".U16", 16), (".S16", 16)):
        if token in suffix:
            bits = width
            break
    return ("load" if op.startswith("LD") else "store"), bits


_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s.*?(0x[0-9a-f]+)")


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward branch's range."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    result = []
    for i, (address, text) in enumerate(instructions):
        match = _BRANCH.match(text)
        if match is None:
            continue
        target = int(match.group(1), 16)
        if target <= address and target in index:
            result.append((index[target], i))
    return result


# ---- rows ----------------------------------------------------------------------------------

def _family_and_variant(demangled: str) -> tuple[str, str]:
    """'void ns::f<float, 4>(float*, long)' -> ('f', 'float, 4')."""
    name = re.sub(r"regops::|\(anonymous namespace\)::|c10::", "", demangled).removeprefix("void ").strip()
    depth = 0
    for i, char in enumerate(name):  # cut the parameter list: the first '(' outside <...>
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            name = name[:i]
            break
    if "<" in name:
        family, variant = name[: name.index("<")], name[name.index("<") + 1: name.rindex(">")]
    else:
        family, variant = name, ""
    return family.split("::")[-1], variant


def _element_bits(demangled: str) -> int | None:
    found = [(demangled.find(t), bits) for t, bits in _ELEMENT_BITS.items() if t in demangled]
    return min(found)[1] if found else None


def _inputs(family: str, variant: str) -> int:
    if family == "multi_tensor_apply_kernel":
        lists = re.search(r",\s*(\d+)\s*,", variant)
        average = 0 if "NoAverage" in variant else 1  # the weight average is one more array
        return int(lists.group(1)) + average if lists else 1
    spec = KERNELS.get(family)
    if spec and spec.vector_template:
        return _op_inputs(variant)
    return spec.inputs if spec else 1


def kernel_row(arch: str, demangled: str, usage: dict[str, int], instructions: list[tuple[int, str]]) -> dict:
    family, variant = _family_and_variant(demangled)
    accesses = [(i, access_bits(text), text) for i, (_, text) in enumerate(instructions)]
    accesses = [(i, kind_bits, text) for i, kind_bits, text in accesses if kind_bits is not None]
    loads = [(i, bits, text) for i, (kind, bits), text in accesses if kind == "load"]
    stores = [(i, bits, text) for i, (kind, bits), text in accesses if kind == "store"]
    local_ops = [text for i, (kind, _), text in accesses if kind == "local"]
    widest_load = max((bits for _, bits, _ in loads), default=0)
    widest_store = max((bits for _, bits, _ in stores), default=0)
    generic_128 = any(re.match(r"^(?:@!?U?P\w+\s+)?(LD|ST)\.", t) and ".128" in t for _, _, t in loads + stores)

    per_element = None
    element_bits = _element_bits(demangled)
    widest_load_sites = [i for i, bits, _ in loads if bits == widest_load]
    candidates = [(last - first, first, last) for first, last in loops(instructions)
                  if any(first <= i <= last for i in widest_load_sites)]
    spec = KERNELS.get(family)
    if not candidates and spec is not None and spec.straight_line and widest_load_sites:
        candidates = [(len(instructions) - 1, 0, len(instructions) - 1)]
    if candidates and element_bits:
        _, first, last = min(candidates)
        widest_in_loop = sum(1 for i in widest_load_sites if first <= i <= last)
        elements = widest_in_loop * widest_load / (element_bits * _inputs(family, variant))
        if elements >= 1:
            per_element = round((last - first + 1) / elements, 1)

    problems = []
    local = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    if local:
        problems.append(f"{usage.get('LOCAL', 0)} B local memory, {usage.get('STACK', 0)} B stack (spills)")
    if local_ops:
        problems.append(f"{len(local_ops)} local-memory instructions (LDL/STL) in the SASS")
    if spec is None:
        problems.append("kernel not classified in benchmarks/static_cuda.py KERNELS")
    elif expects_vectors(family, variant):
        if spec.vector_load and widest_load < 128:
            problems.append(f"vectorized kernel without a 128-bit global load (widest {widest_load})")
        if spec.vector_store and widest_store < 128:
            problems.append(f"vectorized kernel without a 128-bit global store (widest {widest_store})")
    return {
        "kernel": family,
        "variant": variant,
        "arch": arch,
        "registers": usage.get("REG", 0),
        "shared_bytes": usage.get("SHARED", 0),
        "local_bytes": local,
        "widest_load_bits": widest_load,
        "widest_store_bits": widest_store,
        "generic_128": generic_128,
        "instructions_per_element": per_element,
        "problems": problems,
        "source": "",
    }


def _cuobjdump(fatbin: str, option: str) -> str:
    result = subprocess.run([find_tool("cuobjdump"), option, fatbin], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump {option} failed: {result.stderr[-2000:]}")
    return result.stdout


def source_rows(source: str) -> list[dict]:
    """The rows of one .cu file (a single row with the problem when it does
    not compile)."""
    relative = os.path.relpath(source, ROOT)
    try:
        fatbin = compile_fatbin(source)
        usage = parse_resource_usage(_cuobjdump(fatbin, "-res-usage"))
        sass = parse_sass(_cuobjdump(fatbin, "-sass"))
    except RuntimeError as error:
        return [{"kernel": "(compile)", "variant": "", "arch": ",".join(ARCHS), "registers": 0, "shared_bytes": 0,
                 "local_bytes": 0, "widest_load_bits": 0, "widest_store_bits": 0, "generic_128": False,
                 "instructions_per_element": None, "problems": [str(error)], "source": relative}]
    names = sorted({name for functions in usage.values() for name in functions})
    demangled = demangle(names)
    rows = []
    for arch in ARCHS:
        for name in names:
            if name not in usage.get(arch, {}):
                continue
            row = kernel_row(arch, demangled[name], usage[arch][name], sass.get(arch, {}).get(name, []))
            row["source"] = relative
            rows.append(row)
    # A kernel of the source that no instantiation compiled to is unchecked.
    with open(source) as handle:
        declared = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", handle.read()))
    seen = {row["kernel"] for row in rows}
    for family in sorted(declared - seen):
        rows.append({"kernel": family, "variant": "", "arch": ",".join(ARCHS), "registers": 0, "shared_bytes": 0,
                     "local_bytes": 0, "widest_load_bits": 0, "widest_store_bits": 0, "generic_128": False,
                     "instructions_per_element": None, "problems": ["declared but never instantiated"],
                     "source": relative})
    return rows


def rows(only: str | None = None) -> list[dict]:
    """Every kernel instantiation of csrc/cuda/*.cu on every arch. Raises
    RuntimeError when nvcc, cuobjdump or c++filt is missing."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"static CUDA gate needs {', '.join(missing)}")
    nvcc_flags()  # import torch once, before the threads
    jobs = max(1, min(len(sources(only)), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
    with ThreadPoolExecutor(jobs) as pool:
        per_source = list(pool.map(source_rows, sources(only)))
    return [row for source in per_source for row in source]


def main() -> int:
    # --only=STEM: the kernels of csrc/cuda/STEM.cu alone (e.g. --only=optim).
    only = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--only=")), None)
    table = rows(only)
    for row in table:
        print(json.dumps(row))
    return 1 if any(row["problems"] for row in table) else 0


if __name__ == "__main__":
    sys.exit(main())
