"""The offline compile gate of the Triton kernels (benchmarks/static_triton.py):
every kernel, under every argument specialization its launchers produce,
compiles for sm_90 and sm_80 without a GPU, with no spills and with 128-bit
global accesses where the data is aligned."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_every_triton_kernel_compiles_offline_without_spills_or_scalar_accesses():
    from benchmarks import static_triton

    rows = static_triton.rows()
    bad = [row for row in rows if row["problems"]]
    assert not bad, "\n" + static_triton.table(bad) + "\n\nall rows:\n" + static_triton.table(rows)
    compiled = {(row["kernel"], row["arch"]) for row in rows}
    kernels = {row["kernel"] for row in rows}
    assert {arch for _, arch in compiled} == {"sm_90", "sm_80"}
    assert all((kernel, arch) in compiled for kernel in kernels for arch in ("sm_90", "sm_80"))
    # Every *_kernel of regops/triton is compiled (the gate's coverage rows
    # would name one that is not, but check the inventory independently).
    source = os.path.join(os.path.dirname(os.path.dirname(__file__)), "regops", "triton")
    defined = set()
    for name in os.listdir(source):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(source, name)) as f:
                lines = f.read().splitlines()
            defined |= {line.split("(")[0][4:] for line in lines if line.startswith("def _") and
                        line.split("(")[0].endswith("_kernel")}
    assert defined and defined <= kernels, defined - kernels
