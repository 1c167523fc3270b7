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

}  // namespace regops
