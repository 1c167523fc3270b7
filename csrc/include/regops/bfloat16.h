// float32 -> bfloat16 bits, rounded to nearest even as c10::BFloat16 rounds,
// NaN kept a quiet NaN. Branch-free, so the CPU loops that store bfloat16
// through it vectorize.
#pragma once

#include <cstdint>
#include <cstring>

#include "regops/macros.h"

namespace regops {

REGOPS_INLINE uint16_t bfloat16_bits_nearest(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

}  // namespace regops
