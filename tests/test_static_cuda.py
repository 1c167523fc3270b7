"""The static CUDA gate (benchmarks/static_cuda.py): every kernel of
csrc/cuda compiled offline for sm_80 and sm_90 with the build's flags has no
spill and, where it is meant to vectorize, 128-bit global accesses. The
parser tests below feed the gate SASS with a planted defect, so the gate is
seen to fail without compiling anything."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import static_cuda  # noqa: E402

MISSING = static_cuda.missing_tools()
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"the static CUDA gate needs {', '.join(MISSING)}")


@pytest.fixture(scope="module")
def rows():
    return static_cuda.rows()


@needs_tools
def test_every_cuda_kernel_passes_the_static_gate(rows):
    problems = [f"{r['kernel']}<{r['variant']}> {r['arch']}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]
    assert not problems, "\n".join(problems)


@needs_tools
def test_every_classified_kernel_is_compiled_for_both_archs(rows):
    seen = {(r["kernel"], r["arch"]) for r in rows}
    for kernel in static_cuda.KERNELS:
        for arch in static_cuda.ARCHS:
            assert (kernel, arch) in seen, f"{kernel} has no {arch} row"


@needs_tools
def test_vectorized_kernels_move_128_bits_and_report_a_cost(rows):
    for row in rows:
        spec = static_cuda.KERNELS[row["kernel"]]
        if not static_cuda.expects_vectors(row["kernel"], row["variant"]):
            continue  # the scalar path of a kernel templated on its vector width
        if spec.vector_load:
            assert row["widest_load_bits"] == 128, row
            assert row["instructions_per_element"] is not None and row["instructions_per_element"] > 0, row
        if spec.vector_store:
            assert row["widest_store_bits"] == 128, row


# ---- the gate itself, on planted SASS --------------------------------------------------------

NAME = "void regops::(anonymous namespace)::dropout_forward_kernel<float>(float const*, float*, long)"


def _sass(*body: str) -> list[tuple[int, str]]:
    return [(16 * i, text) for i, text in enumerate(body)]


def _loop(*body: str) -> list[tuple[int, str]]:
    """body inside a loop that branches back to its first instruction."""
    return _sass(*body, "@P0 BRA 0x0", "EXIT")


def test_gate_passes_a_vectorized_loop():
    row = static_cuda.kernel_row("sm_90", NAME, {"REG": 28, "STACK": 0, "LOCAL": 0},
                                 _loop("LDG.E.128 R4, desc[UR4][R2.64]", "FMUL R4, R4, R8", "STG.E.128 desc[UR4][R6.64], R4"))
    assert row["problems"] == []
    assert (row["kernel"], row["variant"]) == ("dropout_forward_kernel", "float")
    assert row["widest_load_bits"] == row["widest_store_bits"] == 128
    assert row["instructions_per_element"] == 4 / 4  # 4 instructions (the branch too), one vector of 4 floats


def test_gate_fails_a_scalar_vector_path():
    row = static_cuda.kernel_row("sm_90", NAME, {"REG": 28}, _loop("LDG.E R4, desc[UR4][R2.64]", "STG.E.64 desc[UR4][R6.64], R4"))
    assert any("128-bit global load" in p for p in row["problems"])
    assert any("128-bit global store" in p for p in row["problems"])


def test_gate_fails_a_spill():
    row = static_cuda.kernel_row("sm_90", NAME, {"REG": 255, "STACK": 32, "LOCAL": 0},
                                 _loop("LDG.E.128 R4, desc[UR4][R2.64]", "STL [R1], R4", "LDL R4, [R1]",
                                       "STG.E.128 desc[UR4][R6.64], R4"))
    assert any("stack" in p for p in row["problems"])
    assert any("LDL/STL" in p for p in row["problems"])


def test_gate_fails_an_unclassified_kernel():
    row = static_cuda.kernel_row("sm_90", "void regops::new_kernel<float>(float*)", {"REG": 8}, _sass("EXIT"))
    assert row["problems"] == ["kernel not classified in benchmarks/static_cuda.py KERNELS"]


def test_generic_128_bit_accesses_count_and_are_flagged():
    row = static_cuda.kernel_row("sm_90", NAME, {"REG": 28}, _loop("LD.E.128 R4, [R2.64]", "ST.E.128 [R6.64], R4"))
    assert row["problems"] == [] and row["generic_128"]
