// The dropout random rule and its constants, one spec for the CPU and CUDA
// kernels (README, "The dropout random rule"): which elements a call keeps,
// the scale of kept ones and the packed-mask size. No ATen here; the
// launchers' checks and layouts are in dropout_host.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "regops/macros.h"
#include "regops/philox.h"

namespace regops {

// floor(p * 2^32): a Philox word w keeps its element iff w >= threshold, so
// p = 0 keeps everything and p = 1 (threshold 2^32) drops everything.
inline uint64_t dropout_threshold(double p) {
  return p >= 1.0 ? (uint64_t{1} << 32) : static_cast<uint64_t>(std::floor(p * 4294967296.0));
}

// 1 / (1 - p), as torch.nn.functional.dropout scales kept elements.
inline double dropout_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

// One bit per element, padded to a multiple of 16 bytes so kernels may store
// the mask with 16-byte vectors.
inline int64_t dropout_mask_bytes(int64_t numel) { return (numel + 127) / 128 * 16; }

// The dropout random rule, one spec for every backend:
// element i of a call with (seed, offset) takes word i % 4 of Philox at counter
// (lo32(offset + i / 4), hi32(offset + i / 4), 0, 0) under key (lo32(seed),
// hi32(seed)), and is kept iff that word >= threshold = floor(p * 2^32).
// One Philox call therefore decides four consecutive elements; a mask byte
// (eight elements) takes two calls.
REGOPS_INLINE Philox4 dropout_random_words(uint64_t seed, uint64_t counter_index) {
  return philox4x32_10(
      Philox4{{static_cast<uint32_t>(counter_index), static_cast<uint32_t>(counter_index >> 32), 0u, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Keep bits of mask byte `byte_index` (elements 8 * byte_index .. + 7), least
// significant bit first. Bits of elements at or past `numel` are zero.
REGOPS_INLINE uint32_t dropout_keep_byte(uint64_t seed, uint64_t offset, int64_t byte_index,
                                         int64_t numel, uint64_t threshold) {
  uint32_t bits = 0;
  const int64_t first = byte_index * 8;
  for (int half = 0; half < 2; ++half) {
    const Philox4 r = dropout_random_words(seed, offset + static_cast<uint64_t>(byte_index) * 2u + half);
    for (int word = 0; word < 4; ++word) {
      const int e = half * 4 + word;
      const bool keep = static_cast<uint64_t>(r.x[word]) >= threshold && first + e < numel;
      bits |= static_cast<uint32_t>(keep) << e;
    }
  }
  return bits;
}

// A kept element is scaled by 1 / (1 - p); a dropped one is multiplied by zero
// (not replaced by it), so NaN and inf propagate as in torch's dropout.
template <typename acc_t>
REGOPS_INLINE acc_t dropout_apply(acc_t value, bool keep, acc_t scale) {
  return value * (keep ? scale : acc_t(0));
}

}  // namespace regops
