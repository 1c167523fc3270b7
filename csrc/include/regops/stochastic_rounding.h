// Stochastic rounding of float32 values to bfloat16 and float16, and the
// Philox rule that draws its random bits; written once for the CPU kernel
// (g++) and the CUDA kernel (nvcc), and again in regops/triton/optim.py and
// regops/reference.py (README "Stochastic rounding" is the spec).
//
// A value rounds away from zero with probability equal to the fraction of
// the target's ulp that truncation would drop, so the rounding error has
// mean zero; representable values, inf and NaN are returned unchanged. The
// functions return float32 values that the target dtype represents exactly,
// so the callers' round-to-nearest store of them is exact.
//
// Random bits: 16 per rounded value. Element i of the tensor with index
// `tensor` in its param group, for the value in `slot` (0 the parameter,
// 1 the momentum buffer or exp_avg, 2 exp_avg_sq, 3 max_exp_avg_sq, 4 the
// weight average), takes 16-bit half (i % 8) % 2 (0: the low half) of word
// (i % 8) / 2 of Philox4x32-10 at counter
//   (lo32(i / 8), lo32(step), tensor, slot + 8 * group)
// under key (lo32(seed), hi32(seed)); one Philox call serves eight
// consecutive elements, which is one 16-byte vector of 16-bit values.
#pragma once

#include <cstdint>
#include <cstring>

#include "regops/macros.h"
#include "regops/philox.h"

namespace regops {

// The slots of the random rule: which value of an element the bits round.
constexpr uint32_t kRoundParam = 0;
constexpr uint32_t kRoundAverage = 4;

// What a call needs to draw the bits; tensor and first (the element index
// of the caller's first element, a multiple of 8) are per tensor or piece.
struct RoundingKey {
  uint32_t key0, key1;  // lo32(seed), hi32(seed)
  uint32_t step;        // lo32(step)
  uint32_t group;
};

REGOPS_INLINE RoundingKey rounding_key(uint64_t seed, uint64_t group, uint64_t step) {
  return RoundingKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(step),
                     static_cast<uint32_t>(group)};
}

// The four words serving elements 8 * block .. 8 * block + 7 of `tensor`'s `slot`.
REGOPS_INLINE Philox4 rounding_words(const RoundingKey& k, uint64_t block, uint32_t tensor, uint32_t slot) {
  return philox4x32_10(Philox4{{static_cast<uint32_t>(block), k.step, tensor, slot + 8u * k.group}}, k.key0, k.key1);
}

// The 16 random bits of element 8 * block + e (e < 8) from its block's words.
REGOPS_INLINE uint32_t rounding_bits(const Philox4& words, int e) {
  return (words.x[e >> 1] >> ((e & 1) * 16)) & 0xFFFFu;
}

REGOPS_INLINE uint32_t float_bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
}

REGOPS_INLINE float bits_float(uint32_t bits) {
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

// bfloat16 keeps the top 16 bits of a float32: adding 16 random bits to the
// dropped ones carries into the kept part with probability (dropped / 2^16),
// exactly the fraction of the ulp. No finite or infinite value carries out of
// its sign (0x7F7FFFFF + 0xFFFF < 0x80000000); NaN is returned as it is.
REGOPS_INLINE float stochastic_round_bfloat16(float x, uint32_t random16) {
  const uint32_t bits = float_bits(x);
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (bits + random16) & 0xFFFF0000u;
  return is_nan ? x : bits_float(rounded);
}

// float16 normals (|x| >= 2^-14, up to inf) keep the top 13 of float32's 23
// mantissa bits: the same carry with the 13 most significant random bits,
// exact. float16 subnormals are the multiples of 2^-24: there y = |x| * 2^24
// (exact) rounds up iff random16 + floor(frac(y) * 2^16) >= 2^16, so the
// probability drops the part of the fraction below 2^-16 of an ulp.
// Values past 65504 round to 65504 or to inf (65536 on the grid).
REGOPS_INLINE float stochastic_round_half(float x, uint32_t random16) {
  const uint32_t bits = float_bits(x);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const bool is_nan = magnitude > 0x7F800000u;
  const float normal = bits_float((bits + (random16 >> 3)) & 0xFFFFE000u);
  const float scaled = bits_float(magnitude) * 16777216.0f;  // 2^24
  const float whole = floorf(scaled);
  const uint32_t fraction = static_cast<uint32_t>((scaled - whole) * 65536.0f);
  const float up = (random16 + fraction) >= 65536u ? 1.0f : 0.0f;
  const float subnormal = copysignf((whole + up) * 5.9604644775390625e-8f, x);  // 2^-24
  return is_nan ? x : (magnitude >= 0x38800000u ? normal : subnormal);
}

}  // namespace regops
