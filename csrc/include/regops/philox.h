// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), exactly as in Random123: a counter of four 32-bit words, a key of
// two, ten rounds with the key bumped between rounds. Every backend (C++ CPU,
// CUDA, Triton, the pure-torch reference) implements this same function, and
// the tests check them against Random123's published known-answer vectors.
#pragma once

#include <cstdint>

#include "regops/macros.h"

namespace regops {

struct Philox4 {
  uint32_t x[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

REGOPS_INLINE uint32_t mul_hi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

REGOPS_INLINE Philox4 philox4x32_10(Philox4 counter, uint32_t key0, uint32_t key1) {
  uint32_t c0 = counter.x[0], c1 = counter.x[1], c2 = counter.x[2], c3 = counter.x[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    const uint32_t hi0 = mul_hi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mul_hi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ key0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ key1;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

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
