"""Offline compile gate of the Triton kernels: every kernel of regops/triton/
compiled for sm_90 and sm_80 without a GPU, under exactly the argument sets
its launchers produce, and what each compiled variant costs.

Where the argument sets come from: each module of regops/triton/ has a
``compile_cases()`` that calls its ops on CPU tensors (hostile ones: every
dtype and flag, sizes of 1, of multiples of 16 and of neither, offset views)
while ``regops.triton._launch.recording()`` collects the launches instead of
running them. Each launch is specialized as the JIT does it
(``create_function_from_signature`` and ``native_specialize_impl``: an int
equal to 1 becomes a constexpr, ints and pointers divisible by 16 get
``tt.divisibility``), so the gate compiles what a GPU run would compile.
Distinct specializations are compiled once each per architecture.

A row's ``problems`` (empty: pass):
- the compile error, if any;
- local memory or stack use (spills);
- a variant the module's ``VECTOR_ACCESS`` says must vectorize (aligned
  pointers) whose PTX has no 128-bit global load (or store, where it says
  so: reductions store per-channel partials only);
- coverage (variant "coverage"): a ``*_kernel`` of the module that no case
  launches, a bool constexpr seen with one value only, or a specialized int
  argument never compiled with the value 1 or with a multiple of 16 (unless
  the module's ``NEVER_ONE`` says why it cannot be 1).

``instructions_per_element``: PTX instructions of the kernel's innermost
loop (the largest backward-branch region) or, without a loop, of the whole
kernel, divided by the elements one pass of that code handles (a tile of a
reduction loop, a program's block or chunk otherwise). Static counts: a
kernel with an unmasked and a masked path counts both, so for those the
figure is an upper bound, about twice what one program executes.

Registers, stack and local bytes come from ``cuobjdump -res-usage`` of the
cubin (the cuobjdump that Triton ships); shared bytes are Triton's dynamic
shared memory plus the static shared memory of the cubin.

Run ``python -m benchmarks.static_triton`` for the table (``--json`` for
the rows). Under TRITON_INTERPRET=1 (the test suite without a GPU) the
kernels are interpreter objects, so ``rows()`` runs the gate in a child
process without it.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile

ARCHS = (90, 80)
VECTOR_BITS = 128


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    found = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    return found


def _modules(only: str | None = None):
    import regops.triton as package

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    names = [name for name in names if only is None or name == only]
    return [importlib.import_module(f"regops.triton.{name}") for name in sorted(names)]


def _kernels(module) -> dict:
    from triton.runtime.jit import JITFunction

    return {name: value for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__}


def _specialize(kernel, args, constexprs, backend):
    """(bound arguments by name, specialization, options, signature,
    constexprs, attrs) exactly as JITFunction.run computes them."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constexprs)
    options, signature, constexpr_values, attrs = kernel._pack_args(backend, constexprs, bound, specialization,
                                                                    options)
    return bound, specialization, options, signature, constexpr_values, attrs


def _variant(kernel, bound, specialization) -> str:
    """A short name: the dtype, the true bool constexprs and tile sizes, the
    data pointers that are not 16-byte aligned, the ints that are not
    multiples of 16, and those equal to 1 (compiled in as constants)."""
    parts, ones, unaligned, pointers, odd = [], [], [], [], []
    for param, (kind, attr) in zip(kernel.params, specialization):
        value = bound[param.name]
        if kind == "constexpr":
            if param.name == "DTYPE":
                parts.insert(0, str(value))
            elif isinstance(value, bool):
                if value:
                    parts.append(param.name.lower())
            elif param.name.startswith("BLOCK") and param.name != "BLOCK":
                parts.append(f"{param.name}={value}")
            elif not param.name.startswith(("BLOCK", "CHUNK")):
                ones.append(f"{param.name}={value}")
        elif kind.startswith("*"):
            pointers.append(kind[1:])
            # Tables of pointers and indices are read as scalars anyway.
            if attr != "D" and kind != "*i64":
                unaligned.append(param.name.removesuffix("_ptr"))
        elif kind in ("i32", "i64") and attr != "D":
            odd.append(param.name)
    if "DTYPE" not in bound and pointers:
        parts.insert(0, pointers[0])
    if unaligned:
        parts.append("unaligned " + ",".join(unaligned))
    if odd:
        parts.append("not %16: " + ",".join(odd))
    return " ".join(parts + ones)


_ACCESS = re.compile(r"\b(ld|st)\.global[.\w:]*")


def _access_bits(ptx: str, kind: str) -> int:
    """The widest global access of ``kind`` ("ld" or "st") in bits:
    ld.global.v4.b32 is 128."""
    widest = 0
    for match in _ACCESS.finditer(ptx):
        if match.group(1) != kind:
            continue
        text = match.group(0)
        lanes = re.search(r"\.v(\d)", text)
        width = re.search(r"\.[bfsu](\d+)(?![\w])", text)
        if width:
            widest = max(widest, (int(lanes.group(1)) if lanes else 1) * int(width.group(1)))
    return widest


_LABEL = re.compile(r"^\$(\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+\$(\w+);")


def _instructions(ptx: str) -> tuple[int, bool]:
    """PTX instructions of the innermost loop that loads from global memory
    (the smallest region a branch jumps back into that holds an ld.global),
    or of the whole kernel; and whether it was a loop."""
    body, labels, loops = [], {}, []
    for line in (line.strip() for line in ptx.splitlines()):
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(body)
        elif line.endswith(";") and not line.startswith((".", "//", "{", "}")):
            body.append(line)
            branch = _BRANCH.search(line)
            if branch and branch.group(1) in labels:
                start = labels[branch.group(1)]
                if any("ld.global" in instruction for instruction in body[start:]):
                    loops.append(len(body) - start)
    return (min(loops), True) if loops else (len(body), False)


def _elements(constexprs: dict, module, kernel_name: str, loop: bool) -> int:
    override = getattr(module, "ELEMENTS_PER_ITERATION", {}).get(kernel_name)
    if override is not None:
        return override(constexprs)
    if "BLOCK_O" in constexprs:
        return constexprs["BLOCK_O"] * constexprs["BLOCK_C"] * constexprs["BLOCK_I"]
    if "CHUNK" in constexprs and not loop:
        return constexprs["CHUNK"]
    return constexprs.get("BLOCK", 1)


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key: int(value) for key, value in usage.items()}


def _coverage(module, kernels: dict, launches: list) -> list[dict]:
    """The problems of what compile_cases() reaches, one row per kernel."""
    rows = []
    never_one = getattr(module, "NEVER_ONE", {})
    for name, kernel in kernels.items():
        problems = []
        seen = [bound for launched, bound, _ in launches if launched is kernel]
        if not seen:
            problems.append(f"no call of {module.__name__}.compile_cases() launches {name}")
        else:
            for param in kernel.params:
                values = [bound[param.name] for bound in seen]
                if param.is_constexpr and all(isinstance(v, bool) for v in values) and len(set(values)) < 2:
                    problems.append(f"constexpr {param.name} is only ever {values[0]}")
                ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
                if param.is_constexpr or param.do_not_specialize or len(ints) != len(values):
                    continue
                if 1 not in ints and param.name not in never_one:
                    problems.append(f"int {param.name} is never 1")
                if not any(v % 16 == 0 for v in ints):
                    problems.append(f"int {param.name} is never a multiple of 16")
        rows.append(dict(kernel=name, variant="coverage", arch="-", registers=0, shared_bytes=0, local_bytes=0,
                         widest_load_bits=0, widest_store_bits=0, instructions_per_element=0.0,
                         problems=problems))
    return rows


def _compile_rows(only: str | None = None) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from regops.triton import _launch

    rows = []
    for module in _modules(only):
        kernels = _kernels(module)
        with _launch.recording() as recorded:
            module.compile_cases()
        launches, variants = [], {}
        probe = CUDABackend(GPUTarget("cuda", ARCHS[0], 32))
        for kernel, _grid, args, constexprs in recorded:
            bound, specialization, *_ = _specialize(kernel, args, constexprs, probe)
            launches.append((kernel, bound, specialization))
            key = (kernel.fn.__name__, repr(specialization))
            variants.setdefault(key, (kernel, args, constexprs, bound, specialization))
        rows += [row for row in _coverage(module, kernels, launches) if row["problems"]]
        vector_access = getattr(module, "VECTOR_ACCESS", {})
        for kernel, args, constexprs, bound, specialization in variants.values():
            name = kernel.fn.__name__
            variant = _variant(kernel, bound, specialization)
            expect_vectors = vector_access.get(name, lambda _: set())(bound)
            for arch in ARCHS:
                target = GPUTarget("cuda", arch, 32)
                row = dict(kernel=name, variant=variant, arch=f"sm_{arch}", registers=0, shared_bytes=0,
                           local_bytes=0, widest_load_bits=0, widest_store_bits=0, instructions_per_element=0.0,
                           problems=[])
                rows.append(row)
                try:
                    _, _, options, signature, constexpr_values, attrs = _specialize(kernel, args, constexprs,
                                                                                    CUDABackend(target))
                    compiled = triton.compile(ASTSource(kernel, signature, constexpr_values, attrs), target=target,
                                              options=options.__dict__)
                except Exception as error:  # noqa: BLE001  (any compile failure is the finding)
                    row["problems"].append(f"compile error: {type(error).__name__}: {str(error)[:300]}")
                    continue
                ptx = compiled.asm["ptx"]
                usage = _resources(compiled.asm["cubin"])
                count, loop = _instructions(ptx)
                row.update(registers=usage.get("REG", 0),
                           shared_bytes=compiled.metadata.shared + usage.get("SHARED", 0),
                           local_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
                           widest_load_bits=_access_bits(ptx, "ld"), widest_store_bits=_access_bits(ptx, "st"),
                           instructions_per_element=round(count / _elements(bound, module, name, loop), 3))
                if row["local_bytes"] > 0:
                    row["problems"].append(f"local memory / stack use: {row['local_bytes']} bytes")
                if "ld" in expect_vectors and row["widest_load_bits"] < VECTOR_BITS:
                    row["problems"].append(f"aligned variant without {VECTOR_BITS}-bit global loads")
                if "st" in expect_vectors and row["widest_store_bits"] < VECTOR_BITS:
                    row["problems"].append(f"aligned variant without {VECTOR_BITS}-bit global stores")
    return rows


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rows(only: str | None = None) -> list[dict]:
    """One row per (kernel, variant, arch), plus a row per kernel whose
    coverage has problems. See the module docstring. ``only``: the rows of
    one module of regops/triton/ (its stem)."""
    if not _interpreted():
        return _compile_rows(only)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "benchmarks.static_triton", "--json"] + ([f"--only={only}"] if only else [])
    result = subprocess.run(command, cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"static_triton child failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


COLUMNS = ("kernel", "variant", "arch", "registers", "shared_bytes", "local_bytes", "widest_load_bits",
           "widest_store_bits", "instructions_per_element", "problems")


def table(rows_: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows_:
        cells = [("; ".join(row[c]) or "-") if c == "problems" else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    # --only=STEM: one module of regops/triton/ (e.g. --only=optim).
    only = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--only=")), None)
    result = rows(only)
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        print(table(result))
        bad = [row for row in result if row["problems"]]
        print(f"\n{len(result)} rows, {len(bad)} with problems")
        sys.exit(1 if bad else 0)
