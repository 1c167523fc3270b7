// The dropout random rule as the C++ CPU kernels draw it (csrc/cpu/dropout.cpp
// and csrc/cpu/layer_norm.cpp): blocks of 128 elements, 32 Philox counters and
// 16 mask bytes each. Whole blocks take this loop, which the compiler
// vectorizes; a last, partial block takes the per-byte dropout_keep_byte.
#pragma once

#include <cstdint>

#include "regops/dropout.h"
#include "regops/macros.h"

namespace regops {
namespace {

constexpr int kCountersPerBlock = 32;
constexpr int kElementsPerBlock = kCountersPerBlock * 4;
constexpr int kMaskBytesPerBlock = kElementsPerBlock / 8;

// Keep flags (0 or 1, element order) and mask bytes of the block whose first
// Philox counter is first_counter. Philox is the expensive part of dropout,
// so this is cloned for AVX-512 and AVX2. Everything is branch-free: keep
// flags are random, so a branch would mispredict half the time.
REGOPS_CPU_CLONES
void dropout_keep_block(uint64_t seed, uint64_t first_counter, uint64_t threshold, uint32_t* __restrict__ keep,
                        uint8_t* __restrict__ bytes) {
  uint32_t words[kElementsPerBlock];
  for (int l = 0; l < kCountersPerBlock; ++l) {
    const Philox4 r = dropout_random_words(seed, first_counter + l);
    for (int w = 0; w < 4; ++w) words[4 * l + w] = r.x[w];
  }
  // 32-bit compares vectorize; threshold 2^32 (p = 1) means drop everything.
  const uint32_t low_threshold = threshold > 0xFFFFFFFFull ? 0xFFFFFFFFu : static_cast<uint32_t>(threshold);
  const uint32_t none_kept = threshold > 0xFFFFFFFFull;
  for (int e = 0; e < kElementsPerBlock; ++e) keep[e] = static_cast<uint32_t>(words[e] >= low_threshold) & (none_kept ^ 1u);
  for (int b = 0; b < kMaskBytesPerBlock; ++b) {
    uint32_t bits = 0;
    for (int e = 0; e < 8; ++e) bits |= keep[8 * b + e] << e;
    bytes[b] = static_cast<uint8_t>(bits);
  }
}

}  // namespace
}  // namespace regops
