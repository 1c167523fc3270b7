// How the CUDA batch-norm reductions split their work, as plain arithmetic
// (no CUDA, no ATen) so that a CPU test can check the launch of any shape.
//
// The partial kernels run on a one-dimensional grid of groups x splits
// blocks, block b reducing slice b % splits of group b / splits (a group is
// one channel, or one tile of channels). One dimension because grid.y and
// grid.z stop at 65535 while torch accepts more channels than that; grid.x
// goes to 2^31 - 1.
#pragma once

#include <algorithm>
#include <cstdint>

namespace regops {

constexpr int64_t kMaxGridBlocks = (int64_t{1} << 31) - 1;

struct ReductionLaunch {
  int64_t splits;           // blocks per group
  int64_t blocks;           // groups * splits, the grid
  int64_t items_per_block;  // ceil(items / splits)
};

// groups of `items` items each: at least min_items_per_block items per block
// (fewer would cost more in partials than they save), and no more blocks
// than target_blocks in all unless every group needs one.
inline ReductionLaunch reduction_launch(int64_t groups, int64_t items, int64_t min_items_per_block,
                                        int64_t target_blocks) {
  const int64_t by_work = (items + min_items_per_block - 1) / min_items_per_block;
  const int64_t by_device = (target_blocks + groups - 1) / std::max<int64_t>(1, groups);
  const int64_t splits = std::max<int64_t>(1, std::min(by_work, by_device));
  return {splits, groups * splits, (items + splits - 1) / splits};
}

// ---- the two-dimensional launches of the batch-norm kernels -------------------------
//
// Every kernel runs on a grid (groups, slices): grid.x a channel (NCHW) or a
// tile of channels (channel-inner), so a thread's channels are fixed and no
// element needs channel arithmetic; grid.y slices of the rows, walked with a
// grid stride. grid.y stops at 65535, grid.x at 2^31 - 1.
constexpr int64_t kMaxGridY = 65535;

// Spatial-inner (NCHW) rows of `vectors` vectors each (S / vector width):
// the block's threads form groups of row_threads (a power of two, the
// smallest whose `unroll` loads per thread cover the row, at most the block),
// one row per group; a row longer than one group covers with
// segment_passes passes is cut into segments. Items (row, segment) are
// what the slices share out.
struct RowLaunch {
  int64_t row_threads;
  int64_t groups;           // rows a block works on at once
  int64_t segment_vectors;  // vectors per segment
  int64_t segments;         // segments per row
  int64_t items;            // batch * segments
};

inline RowLaunch row_launch(int64_t batch, int64_t vectors, int64_t block_threads, int64_t unroll,
                            int64_t segment_passes) {
  const int64_t wanted = (vectors + unroll - 1) / unroll;
  int64_t row_threads = 1;
  while (row_threads < wanted && row_threads < block_threads) row_threads *= 2;
  const int64_t groups = block_threads / row_threads;
  const int64_t segment_vectors =
      row_threads == block_threads ? block_threads * unroll * segment_passes : std::max<int64_t>(1, vectors);
  const int64_t segments = std::max<int64_t>(1, (vectors + segment_vectors - 1) / segment_vectors);
  return {row_threads, groups, segment_vectors, segments, batch * segments};
}

// Channel-inner tiles: tile_threads threads (a power of two, at most 32) own
// one vector of channels each; block_threads / tile_threads of them walk rows.
struct ChannelLaunch {
  int64_t tile_threads;  // blockDim.x
  int64_t row_threads;   // blockDim.y
  int64_t tiles;         // grid.x
};

inline ChannelLaunch channel_launch(int64_t channel_vectors, int64_t block_threads) {
  int64_t tile_threads = 1;
  while (tile_threads < channel_vectors && tile_threads < 32) tile_threads *= 2;
  return {tile_threads, block_threads / tile_threads,
          std::max<int64_t>(1, (channel_vectors + tile_threads - 1) / tile_threads)};
}

// grid.y: enough slices that groups * slices reaches target_blocks, no more
// than there are units of work (items or rows, `per_pass` of them a block
// takes at once) or than min_units_per_slice allows, and at most 65535.
inline int64_t grid_slices(int64_t groups, int64_t units, int64_t per_pass, int64_t target_blocks,
                           int64_t min_units_per_slice = 1) {
  const int64_t by_device = (target_blocks + std::max<int64_t>(1, groups) - 1) / std::max<int64_t>(1, groups);
  const int64_t by_work = (units + std::max<int64_t>(per_pass, min_units_per_slice) - 1) /
                          std::max<int64_t>(per_pass, min_units_per_slice);
  return std::max<int64_t>(1, std::min({by_device, by_work, kMaxGridY}));
}

}  // namespace regops
