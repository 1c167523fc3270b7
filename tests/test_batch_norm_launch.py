"""The launch arithmetic of the CUDA batch-norm reductions
(csrc/include/regops/batch_norm_launch.h), compiled with the host C++
compiler and checked for any shape: every channel gets its blocks on the
one-dimensional grid, the grid fits grid.x (2^31 - 1), and the slices of a
channel cover it. The kernels themselves run where there is a GPU."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "regops/batch_norm_launch.h"
int main(int argc, char** argv) {
  for (int i = 1; i + 3 < argc; i += 4) {
    const regops::ReductionLaunch l = regops::reduction_launch(
        std::atoll(argv[i]), std::atoll(argv[i + 1]), std::atoll(argv[i + 2]), std::atoll(argv[i + 3]));
    std::printf("%lld %lld %lld\n", (long long)l.splits, (long long)l.blocks, (long long)l.items_per_block);
  }
  std::printf("%lld\n", (long long)regops::kMaxGridBlocks);
}
"""

# (groups, items per group, minimum items per block, target blocks): few and
# many channels, NCHW (a channel per group) and channel tiles of 32.
CASES = [(1, 1, 4096, 528), (3, 10**7, 4096, 528), (64, 2 * 10**6, 4096, 1056), (65535, 4, 4096, 528),
         (65536, 4, 4096, 528), (70001, 3 * 2, 4096, 528), (10**6, 10**3, 4096, 1056),
         ((10**6 + 31) // 32, 7, 128, 1056), (2**31 - 1, 1, 4096, 528), (5, 0, 4096, 528)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    if CXX is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp("launch")
    source, binary = folder / "launch.cpp", folder / "launch"
    source.write_text(PROGRAM)
    subprocess.run([CXX, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), str(source), "-o",
                    str(binary)], check=True)
    output = subprocess.run([str(binary)] + [str(v) for case in CASES for v in case], check=True,
                            capture_output=True, text=True).stdout.split("\n")
    rows = [tuple(int(v) for v in line.split()) for line in output[:len(CASES)]]
    return rows, int(output[len(CASES)])


def test_every_channel_fits_one_launch_and_is_covered(launches):
    rows, max_grid = launches
    assert max_grid == 2**31 - 1
    for (groups, items, min_items, target), (splits, blocks, per_block) in zip(CASES, rows):
        assert splits >= 1 and blocks == groups * splits, (groups, splits, blocks)
        assert blocks <= max_grid, f"{groups} groups need {blocks} blocks: more than grid.x holds"
        assert per_block * splits >= items, "the slices of a channel cover it"
        if items:
            assert (splits - 1) * per_block < items, "no slice is empty"
        assert splits == 1 or per_block >= min_items // 2, "blocks keep enough work each"
        assert blocks <= max(groups, target + groups), "no more blocks than the device holds, unless C needs them"
