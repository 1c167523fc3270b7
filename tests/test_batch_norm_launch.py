"""The launch arithmetic of the CUDA batch-norm reductions
(csrc/include/regops/batch_norm_launch.h), compiled with the host C++
compiler and checked for any shape: every channel gets its blocks on the
one-dimensional grid, the grid fits grid.x (2^31 - 1), and the slices of a
channel cover it. The kernels themselves run where there is a GPU."""

import pytest

from conftest import run_host_program

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
    output = run_host_program(tmp_path_factory, "launch", PROGRAM, [v for case in CASES for v in case]).split("\n")
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


# ---- the two-dimensional launches of the kernels -----------------------------------------

GRID_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "regops/batch_norm_launch.h"
int main(int argc, char** argv) {
  int i = 1;
  const long long rows_cases = std::atoll(argv[i++]);
  for (long long k = 0; k < rows_cases; ++k, i += 2) {
    const regops::RowLaunch l = regops::row_launch(std::atoll(argv[i]), std::atoll(argv[i + 1]), 256, 4, 4);
    std::printf("%lld %lld %lld %lld %lld\n", (long long)l.row_threads, (long long)l.groups,
                (long long)l.segment_vectors, (long long)l.segments, (long long)l.items);
  }
  const long long channel_cases = std::atoll(argv[i++]);
  for (long long k = 0; k < channel_cases; ++k, ++i) {
    const regops::ChannelLaunch l = regops::channel_launch(std::atoll(argv[i]), 256);
    std::printf("%lld %lld %lld\n", (long long)l.tile_threads, (long long)l.row_threads, (long long)l.tiles);
  }
  const long long slice_cases = std::atoll(argv[i++]);
  for (long long k = 0; k < slice_cases; ++k, i += 5) {
    std::printf("%lld\n", (long long)regops::grid_slices(std::atoll(argv[i]), std::atoll(argv[i + 1]),
                                                           std::atoll(argv[i + 2]), std::atoll(argv[i + 3]),
                                                           std::atoll(argv[i + 4])));
  }
}
"""

# (batch, vectors per row): short rows (7x7 scalar, 28x28 / 4), long rows
# (112x112 / 8, a 10^7-element row), one row, empty rows.
ROW_CASES = [(256, 49), (256, 196), (256, 1568), (2, 10**7), (1, 1), (3, 0), (65536 * 3, 5)]
# Channel vectors: 1, a few, 64 / 8, 2048 / 4, more than 65535 channels, 2^31 - 1.
CHANNEL_CASES = [1, 3, 8, 512, 70001, 2**31 - 1]
# (groups, units, per pass, target blocks, min units per slice): few and many
# channels, more rows than grid.y holds, no work.
SLICE_CASES = [(64, 256, 4, 1056, 1), (70001, 6, 1, 1056, 4), (1, 10**9, 1, 10**6, 1), (3, 10**7, 8, 528, 16),
               (2**31 - 1, 1, 1, 1056, 1), (5, 0, 1, 528, 1)]


@pytest.fixture(scope="module")
def grid_launches(tmp_path_factory):
    args = [len(ROW_CASES)] + [v for case in ROW_CASES for v in case] + [len(CHANNEL_CASES)] + CHANNEL_CASES
    args += [len(SLICE_CASES)] + [v for case in SLICE_CASES for v in case]
    lines = run_host_program(tmp_path_factory, "grid", GRID_PROGRAM, args).split("\n")
    parsed = [tuple(int(v) for v in line.split()) for line in lines if line]
    rows = parsed[:len(ROW_CASES)]
    channels = parsed[len(ROW_CASES):len(ROW_CASES) + len(CHANNEL_CASES)]
    slices = [p[0] for p in parsed[len(ROW_CASES) + len(CHANNEL_CASES):]]
    return rows, channels, slices


def test_row_groups_cover_every_row(grid_launches):
    rows, _, _ = grid_launches
    for (batch, vectors), (row_threads, groups, segment_vectors, segments, items) in zip(ROW_CASES, rows):
        assert row_threads & (row_threads - 1) == 0 and 1 <= row_threads <= 256, row_threads
        assert row_threads * groups == 256
        assert row_threads == 256 or row_threads * 4 >= vectors, "a short row is one pass of its group"
        assert segments * segment_vectors >= vectors and (segments - 1) * segment_vectors < max(1, vectors)
        assert items == batch * segments


def test_channel_tiles_fit_grid_x_for_any_channel_count(grid_launches):
    _, channels, _ = grid_launches
    for vectors, (tile_threads, row_threads, tiles) in zip(CHANNEL_CASES, channels):
        assert tile_threads & (tile_threads - 1) == 0 and 1 <= tile_threads <= 32
        assert tile_threads * row_threads == 256
        assert tiles * tile_threads >= vectors and (tiles - 1) * tile_threads < vectors
        assert tiles <= 2**31 - 1, f"{vectors} channel vectors need {tiles} tiles: more than grid.x holds"


def test_slices_fit_grid_y(grid_launches):
    """grid.y stops at 65535: the kernels walk the rest with a grid stride,
    so any number of slices from 1 to 65535 covers the work."""
    _, _, slices = grid_launches
    for (groups, units, per_pass, target, min_units), count in zip(SLICE_CASES, slices):
        assert 1 <= count <= 65535, (groups, units, count)
        if units:
            assert count <= max(1, -(-units // max(per_pass, min_units))), "no slice without work"
