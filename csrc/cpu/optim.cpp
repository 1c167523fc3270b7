// Penalized SGD and AdamW on the CPU: one call updates every tensor of a
// (device, dtype) group. The tensors are laid end to end in one index space
// (TensorSpan) cut into chunks of kChunk elements, so that at::parallel_for
// gives every thread the same number of elements whatever the tensor sizes
// (cutting each tensor into its own chunks left the threads unequal work
// and made two threads slower than torch's fused optimizers). Inside a
// chunk the element update of regops/optim.h runs in loops the compiler
// vectorizes, on float32 tensors directly and on bfloat16 tensors as bits
// converted in registers (shift to widen, round-to-nearest-even with bit
// operations to narrow: c10's per-element bfloat16 conversion does not
// vectorize); float16 goes through float32 blocks of kBlock elements;
// float64 runs the same loops with float64 math.
//
// Traffic per parameter (element size e): SGD reads p, g and the momentum
// buffer and writes p and the buffer (5e; 3e without momentum); AdamW reads
// p, g, exp_avg, exp_avg_sq and writes p, exp_avg, exp_avg_sq (7e; 9e with
// amsgrad).
// No floating-point contraction in this file (GCC contracts a * b + c into
// an FMA in the AVX2 / AVX-512 clones by default): every product and sum is
// rounded on its own, as in regops/reference.py and the CUDA kernels
// (mul_rn in regops/optim.h), so the float32 value that stochastic rounding
// sees is the same bits on every backend. Before every include, so that all
// functions inlined into the loops carry the same options.
#pragma GCC optimize("fp-contract=off")

#include "regops/aten.h"
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <type_traits>
#include <vector>

#include "regops/bfloat16.h"
#include "regops/optim.h"
#include "regops/optim_host.h"
#include "regops/stochastic_rounding.h"

namespace regops {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task: ~1 MiB of traffic for AdamW float32
constexpr int64_t kAlign = 64;       // each tensor starts at a multiple of this in the index space (cache lines)
constexpr int64_t kBlock = 512;      // float16 path: five float32 lists of 512 stay in L1
// float32, float64 and bfloat16: one call of the loops covers at most this
// many elements, so that the weight average, updated after the parameter
// (CallAverages::update), finds the parameter still in L1 (5 float32 lists
// of 2048: 40 KiB) and its stream runs interleaved with the update's.
constexpr int64_t kPass = 2048;
// Below this many elements in all, a call runs on the calling thread: waking
// the pool costs more than the work.
constexpr int64_t kSerialBelow = 1 << 16;

// --- vectorizable loops --------------------------------------------------------
// Compiled for AVX-512 and AVX2 as well (REGOPS_CPU_CLONES, macros.h); the
// loader picks the best the processor has. The loops run on float32 storage
// or directly on bfloat16 bits (Bits16), converting in registers: one pass
// over memory, no staging buffers. float16 goes through float32 blocks
// (apply_blocks).

using Bits16 = uint16_t;  // bfloat16 storage

REGOPS_ALWAYS_INLINE float load_element(const float* data, int64_t i) { return data[i]; }
REGOPS_ALWAYS_INLINE void store_element(float* data, int64_t i, float value) { data[i] = value; }
REGOPS_ALWAYS_INLINE double load_element(const double* data, int64_t i) { return data[i]; }
REGOPS_ALWAYS_INLINE void store_element(double* data, int64_t i, double value) { data[i] = value; }

// The math type of the loops on storage T: float64 for float64, else float32.
template <typename T>
using Math = std::conditional_t<std::is_same_v<T, double>, double, float>;

// bfloat16 <-> float32 as bit operations: widening is a shift; narrowing
// rounds to nearest even (regops/bfloat16.h), as c10::BFloat16 does.
REGOPS_ALWAYS_INLINE float load_element(const Bits16* data, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(data[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

REGOPS_ALWAYS_INLINE float load_element(const at::Half* data, int64_t i) { return static_cast<float>(data[i]); }
REGOPS_ALWAYS_INLINE void store_element(at::Half* data, int64_t i, float value) { data[i] = value; }

REGOPS_ALWAYS_INLINE void store_element(Bits16* data, int64_t i, float value) {
  data[i] = bfloat16_bits_nearest(value);
}

// Stochastic rounding (regops/stochastic_rounding.h) of one piece of a
// tensor: the key of the call, the tensor's index in its param group and the
// element index of the piece's first element in the random rule.
struct PieceRounding {
  RoundingKey key;
  uint32_t tensor;
  int64_t first;
};

// --- random bits of stochastic rounding ------------------------------------------
// One draw serves a batch of kRoundBlock elements for every rounded value
// (slot) of the loop: Philox4x32-10 (regops/philox.h) at kRoundCounters
// consecutive counters per slot, in SIMD lanes (vpmuludq: 32 x 32 -> 64-bit
// products), several slots in flight together. The batch is small so that
// the out-of-order core can overlap a batch's draw (computation only) with
// the update of the previous batch. The version runs for the processor, picked at load time
// (GCC function multiversioning); the default one calls rounding_words per
// counter. All of them write word j of counter c of slot s at
// bits[s] + 2 * (4 * c + j): read as 16-bit halves (x86 is little-endian)
// element 8 * c + e finds its bits at bits[s][8 * c + e], the random rule's order.
constexpr int kRoundCounters = 16;
constexpr int64_t kRoundBlock = 8 * kRoundCounters;
constexpr int kMaxRoundSlots = 4;
using RoundingBits = uint16_t[kMaxRoundSlots][kRoundBlock];
static_assert(std::endian::native == std::endian::little);

// AVX-512: eight counters per vector, each word in the low half of a 64-bit
// lane, so that vpmuludq gives the whole product of a lane and the high word
// is one swap away (vpshufd, port 5, leaving port 0 to the multiplies); the
// upper halves carry junk that no low half ever reads. Two vectors per slot,
// two slots (four vectors) in flight.
template <int kSlots>
__attribute__((target("arch=x86-64-v4"))) REGOPS_ALWAYS_INLINE void draw_slots_avx512(const RoundingKey& k,
                                                                                       uint64_t block, uint32_t tensor,
                                                                                       uint32_t first_slot,
                                                                                       uint16_t (*bits)[kRoundBlock]) {
  constexpr int kVectors = 2 * kSlots;  // vector v: counters 8 * (v % 2) + 0..7 of slot v / 2
  constexpr _MM_PERM_ENUM kSwap = _MM_PERM_CDAB;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  __m512i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = _mm512_add_epi64(_mm512_set1_epi64(block + 8 * (v % 2)), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    c1[v] = _mm512_set1_epi64(k.step);
    c2[v] = _mm512_set1_epi64(tensor);
    c3[v] = _mm512_set1_epi64(first_slot + v / 2 + 8u * k.group);
  }
  uint32_t key0 = k.key0, key1 = k.key1;
  for (int round = 0; round < 10; ++round, key0 += kPhiloxW0, key1 += kPhiloxW1) {
    const __m512i k0 = _mm512_set1_epi32(key0), k1 = _mm512_set1_epi32(key1);
    for (int v = 0; v < kVectors; ++v) {
      const __m512i product0 = _mm512_mul_epu32(c0[v], m0), product1 = _mm512_mul_epu32(c2[v], m1);
      c0[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(product1, kSwap), c1[v], k0, 0x96);  // three-way xor
      c1[v] = product1;
      c2[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(product0, kSwap), c3[v], k1, 0x96);
      c3[v] = product0;
    }
  }
  // Counter-major order: words01 holds (word 0, word 1) of each counter as a
  // 64-bit lane, words23 (word 2, word 3); 128-bit lane L of first / second
  // then holds the four words of counter 2 * L / 2 * L + 1.
  const __m512i low_order = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i high_order = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int v = 0; v < kVectors; ++v) {
    const __m512i words01 = _mm512_mask_shuffle_epi32(c0[v], 0xAAAA, c1[v], kSwap);
    const __m512i words23 = _mm512_mask_shuffle_epi32(c2[v], 0xAAAA, c3[v], kSwap);
    const __m512i first = _mm512_unpacklo_epi64(words01, words23), second = _mm512_unpackhi_epi64(words01, words23);
    uint16_t* out = bits[v / 2] + 64 * (v % 2);
    _mm512_storeu_si512(out, _mm512_permutex2var_epi64(first, low_order, second));
    _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi64(first, high_order, second));
  }
}

__attribute__((target("arch=x86-64-v4"))) void draw_rounding_words(const RoundingKey& k, uint64_t block,
                                                                    uint32_t tensor, uint32_t first_slot, int slots,
                                                                    RoundingBits& bits) {
  for (int s = 0; s < slots; s += 2) {
    if (s + 1 < slots) {
      draw_slots_avx512<2>(k, block, tensor, first_slot + s, bits + s);
    } else {
      draw_slots_avx512<1>(k, block, tensor, first_slot + s, bits + s);
    }
  }
}

// AVX2: two vectors of eight counters per slot, one slot at a time (sixteen
// registers).
__attribute__((target("arch=x86-64-v3"))) void draw_rounding_words(const RoundingKey& k, uint64_t block,
                                                                    uint32_t tensor, uint32_t first_slot, int slots,
                                                                    RoundingBits& bits) {
  constexpr int kVectors = kRoundCounters / 8;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int s = 0; s < slots; ++s) {
    __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<uint32_t>(block + 8 * v)), lanes);
      c1[v] = _mm256_set1_epi32(k.step);
      c2[v] = _mm256_set1_epi32(tensor);
      c3[v] = _mm256_set1_epi32(first_slot + s + 8u * k.group);
    }
    uint32_t key0 = k.key0, key1 = k.key1;
    for (int round = 0; round < 10; ++round, key0 += kPhiloxW0, key1 += kPhiloxW1) {
      const __m256i k0 = _mm256_set1_epi32(key0), k1 = _mm256_set1_epi32(key1);
      for (int v = 0; v < kVectors; ++v) {
        const __m256i even0 = _mm256_mul_epu32(c0[v], m0), odd0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[v], 32), m0);
        const __m256i even1 = _mm256_mul_epu32(c2[v], m1), odd1 = _mm256_mul_epu32(_mm256_srli_epi64(c2[v], 32), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(even0, 32), odd0, 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(even1, 32), odd1, 0xAA);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), k0);
        c1[v] = _mm256_blend_epi32(even1, _mm256_slli_epi64(odd1, 32), 0xAA);
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), k1);
        c3[v] = _mm256_blend_epi32(even0, _mm256_slli_epi64(odd0, 32), 0xAA);
      }
    }
    // 128-bit lane L of r[t] holds the four words of counter 4 * L + t.
    for (int v = 0; v < kVectors; ++v) {
      const __m256i t0 = _mm256_unpacklo_epi32(c0[v], c1[v]), t1 = _mm256_unpackhi_epi32(c0[v], c1[v]);
      const __m256i t2 = _mm256_unpacklo_epi32(c2[v], c3[v]), t3 = _mm256_unpackhi_epi32(c2[v], c3[v]);
      const __m256i r0 = _mm256_unpacklo_epi64(t0, t2), r1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i r2 = _mm256_unpacklo_epi64(t1, t3), r3 = _mm256_unpackhi_epi64(t1, t3);
      __m256i* out = reinterpret_cast<__m256i*>(bits[s] + 64 * v);
      _mm256_storeu_si256(out, _mm256_permute2x128_si256(r0, r1, 0x20));
      _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(r2, r3, 0x20));
      _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(r0, r1, 0x31));
      _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(r2, r3, 0x31));
    }
  }
}

__attribute__((target("default"))) void draw_rounding_words(const RoundingKey& k, uint64_t block, uint32_t tensor,
                                                             uint32_t first_slot, int slots, RoundingBits& bits) {
  for (int s = 0; s < slots; ++s) {
    for (int c = 0; c < kRoundCounters; ++c) {
      const Philox4 words = rounding_words(k, block + c, tensor, first_slot + s);
      std::memcpy(bits[s] + 8 * c, words.x, sizeof(words.x));
    }
  }
}

// Batches of the elements [0, n) of a piece for the rounding loops: a batch
// starts at a multiple of 8 in the random rule (only the first one may start
// after it, at `skip`) and ends after at most kRoundBlock of the rule's
// elements, so that one draw covers it. bits[slot][skip + i] serves element
// base + i of the piece.
struct RoundingBatch {
  int64_t base, count, skip;
};

REGOPS_ALWAYS_INLINE RoundingBatch rounding_batch(const PieceRounding& r, int64_t base, int64_t n) {
  const int64_t skip = (r.first + base) % 8;
  return RoundingBatch{base, std::min(kRoundBlock - skip, n - base), skip};
}

// Slots first_slot .. first_slot + slots - 1 of a batch.
REGOPS_ALWAYS_INLINE void draw_rounding_bits(const PieceRounding& r, const RoundingBatch& batch, uint32_t first_slot,
                                             int slots, RoundingBits& bits) {
  draw_rounding_words(r.key, static_cast<uint64_t>(r.first + batch.base) / 8, r.tensor, first_slot, slots, bits);
}

// body(batch, bits) for the batches of the elements [0, n) of a piece, each
// after drawing the slots first_slot .. first_slot + slots - 1 of its bits.
template <typename Body>
REGOPS_ALWAYS_INLINE void for_rounding_batches(const PieceRounding& r, int64_t n, uint32_t first_slot, int slots,
                                               Body&& body) {
  RoundingBits bits;
  for (int64_t base = 0; base < n;) {
    const RoundingBatch batch = rounding_batch(r, base, n);
    draw_rounding_bits(r, batch, first_slot, slots, bits);
    body(batch, bits);
    base += batch.count;
  }
}

// Stores the stochastically rounded value for storage T: bfloat16 bits
// directly (the top half of b + r, or for NaN the canonical NaN that
// bfloat16_bits_nearest stores: what rounding and then storing would give),
// float32 blocks staged for float16 as the value stochastic_round_half gives
// (float32 storage is never rounded).
REGOPS_ALWAYS_INLINE void store_stochastic(Bits16* data, int64_t i, float value, uint32_t random16) {
  const uint32_t bits = float_bits(value);
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  data[i] = static_cast<Bits16>(is_nan ? 0x7FC0u : (bits + random16) >> 16);
}

REGOPS_ALWAYS_INLINE void store_stochastic(float* data, int64_t i, float value, uint32_t random16) {
  data[i] = stochastic_round_half(value, random16);
}

// The weight average of one piece: average = lerp(average, p, weight) from
// the stored parameter, right after the update of the same piece (still in
// cache). P is the loop type of the parameter (kHalfParam: float32 values
// staged for float16 storage, rounded here as the store rounds them); A is
// the average's storage: float, Bits16 or at::Half.
template <typename A>
REGOPS_ALWAYS_INLINE float round_average(float value, uint32_t bits) {
  if constexpr (std::is_same_v<A, Bits16>) {
    return stochastic_round_bfloat16(value, bits);
  } else if constexpr (std::is_same_v<A, at::Half>) {
    return stochastic_round_half(value, bits);
  } else {
    return value;
  }
}

template <typename P, typename A, bool kHalfParam, bool kStochastic>
REGOPS_CPU_CLONES void average_block(const P* __restrict__ p, A* __restrict__ average, int64_t n, LerpWeight weight,
                                 const PieceRounding& rounding) {
  using Real = Math<P>;  // float64 for float64 parameters
  const LerpWeightT<Real> w{static_cast<Real>(weight.factor), weight.from_start};
  RoundingBits bits;
  for (int64_t base = 0; base < n;) {
    const RoundingBatch batch = kStochastic ? rounding_batch(rounding, base, n) : RoundingBatch{base, n - base, 0};
    if (kStochastic) draw_rounding_bits(rounding, batch, kRoundAverage, 1, bits);
    for (int64_t i = 0; i < batch.count; ++i) {
      Real param = load_element(p, base + i);
      if (kHalfParam) param = static_cast<float>(static_cast<at::Half>(param));
      Real value = lerp_like_torch(static_cast<Real>(load_element(average, base + i)), param, w);
      if (kStochastic) value = round_average<A>(value, bits[0][batch.skip + i]);
      store_element(average, base + i, value);
    }
    base += batch.count;
  }
}

// The averages of a call: pointers, weights and how to round.
struct CallAverages {
  bool present = false;
  bool stochastic = false;
  at::ScalarType dtype = at::kFloat;
  std::vector<void*> data;
  std::vector<LerpWeight> weights;

  CallAverages(const c10::optional<at::TensorList>& optional_averages,
               const c10::optional<at::Tensor>& average_weights, bool rounding) {
    if (!optional_averages.has_value() || optional_averages->empty()) return;
    const at::TensorList averages = *optional_averages;
    present = true;
    dtype = averages[0].scalar_type();
    stochastic = rounding && (dtype == at::kBFloat16 || dtype == at::kHalf);
    const float* w = average_weights->const_data_ptr<float>();
    for (size_t i = 0; i < averages.size(); ++i) {
      data.push_back(averages[i].data_ptr());
      weights.push_back(lerp_weight(w[i]));
    }
  }

  // After the update of elements [first, first + n) of tensor t, whose
  // parameter values are at p (the loop's view of them).
  template <typename scalar_t, typename P>
  void update(const P* p, int64_t n, int64_t t, int64_t first, const PieceRounding& rounding) const {
    constexpr bool kHalfParam = std::is_same_v<scalar_t, at::Half>;
    auto run = [&](auto* average) {
      if (stochastic) {
        average_block<P, std::remove_pointer_t<decltype(average)>, kHalfParam, true>(p, average + first, n,
                                                                                      weights[t], rounding);
      } else {
        average_block<P, std::remove_pointer_t<decltype(average)>, kHalfParam, false>(p, average + first, n,
                                                                                       weights[t], rounding);
      }
    };
    if (dtype == at::kFloat) {
      run(static_cast<float*>(data[t]));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      run(static_cast<double*>(data[t]));
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      run(static_cast<Bits16*>(data[t]));
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
      run(static_cast<at::Half*>(data[t]));
    }
  }
};

// One clone-compiled function per combination of flags: a flag that would
// make a loop branch (momentum, amsgrad) or compute a term that is off
// (penalties, see regops/optim.h) is a template argument, constant-folded in
// the loop body. select_variant turns the runtime flags into the function.

template <typename T, bool kStochastic, bool kMomentum, bool kFirstStep, bool kNesterov, bool kCoupledL2,
          bool kL1Subgradient, bool kL1Proximal>
REGOPS_CPU_CLONES void sgd_block(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buffer, int64_t n,
                             const SGDCoefficientsT<Math<T>>& coefficients, const PieceRounding& rounding) {
  SGDCoefficientsT<Math<T>> c = coefficients;
  c.has_momentum = kMomentum;
  c.first_step = kFirstStep;
  c.nesterov = kNesterov;
  if constexpr (!kStochastic) {
    for (int64_t i = 0; i < n; ++i) {
      Math<T> param = load_element(p, i);
      Math<T> buf = kMomentum && !kFirstStep ? load_element(buffer, i) : Math<T>(0);
      sgd_update<kCoupledL2, kL1Subgradient, kL1Proximal>(param, load_element(g, i), buf, c);
      store_element(p, i, param);
      if (kMomentum) store_element(buffer, i, buf);
    }
  } else {
    for_rounding_batches(rounding, n, kRoundParam, kMomentum ? 2 : 1,
                         [&](const RoundingBatch& batch, const RoundingBits& bits) __attribute__((always_inline)) {
      T* __restrict__ pb = p + batch.base;
      const T* __restrict__ gb = g + batch.base;
      T* __restrict__ bb = kMomentum ? buffer + batch.base : nullptr;
      const uint16_t* __restrict__ pr = bits[0] + batch.skip;
      const uint16_t* __restrict__ br = bits[1] + batch.skip;
      for (int64_t i = 0; i < batch.count; ++i) {
        Math<T> param = load_element(pb, i);
        Math<T> buf = kMomentum && !kFirstStep ? load_element(bb, i) : Math<T>(0);
        sgd_update<kCoupledL2, kL1Subgradient, kL1Proximal>(param, load_element(gb, i), buf, c);
        store_stochastic(pb, i, param, pr[i]);
        if (kMomentum) store_stochastic(bb, i, buf, br[i]);
      }
    });
  }
}

template <typename T>
using SGDBlock = void (*)(T*, const T*, T*, int64_t, const SGDCoefficientsT<Math<T>>&, const PieceRounding&);

template <typename T, bool kStochastic, bool kAmsgrad, bool kLerpFromStart, bool kCoupledL2, bool kL1Subgradient,
          bool kL1Proximal>
REGOPS_CPU_CLONES void adamw_block(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ exp_avg,
                               T* __restrict__ exp_avg_sq, T* __restrict__ max_exp_avg_sq, int64_t n,
                               const AdamWCoefficientsT<Math<T>>& coefficients, const PieceRounding& rounding) {
  AdamWCoefficientsT<Math<T>> c = coefficients;
  c.amsgrad = kAmsgrad;
  c.exp_avg_weight.from_start = kLerpFromStart;
  if constexpr (!kStochastic) {
    for (int64_t i = 0; i < n; ++i) {
      Math<T> param = load_element(p, i), m = load_element(exp_avg, i), v = load_element(exp_avg_sq, i);
      Math<T> v_max = kAmsgrad ? load_element(max_exp_avg_sq, i) : Math<T>(0);
      adamw_update<kCoupledL2, kL1Subgradient, kL1Proximal>(param, load_element(g, i), m, v, v_max, c);
      store_element(p, i, param);
      store_element(exp_avg, i, m);
      store_element(exp_avg_sq, i, v);
      if (kAmsgrad) store_element(max_exp_avg_sq, i, v_max);
    }
  } else {
    for_rounding_batches(rounding, n, kRoundParam, kAmsgrad ? 4 : 3,
                         [&](const RoundingBatch& batch, const RoundingBits& bits) __attribute__((always_inline)) {
      const int64_t skip = batch.skip;
      T* __restrict__ pb = p + batch.base;
      const T* __restrict__ gb = g + batch.base;
      T* __restrict__ mb = exp_avg + batch.base;
      T* __restrict__ vb = exp_avg_sq + batch.base;
      T* __restrict__ vmb = kAmsgrad ? max_exp_avg_sq + batch.base : nullptr;
      for (int64_t i = 0; i < batch.count; ++i) {
        Math<T> param = load_element(pb, i), m = load_element(mb, i), v = load_element(vb, i);
        Math<T> v_max = kAmsgrad ? load_element(vmb, i) : Math<T>(0);
        adamw_update<kCoupledL2, kL1Subgradient, kL1Proximal>(param, load_element(gb, i), m, v, v_max, c);
        store_stochastic(pb, i, param, bits[0][skip + i]);
        store_stochastic(mb, i, m, bits[1][skip + i]);
        store_stochastic(vb, i, v, bits[2][skip + i]);
        if (kAmsgrad) store_stochastic(vmb, i, v_max, bits[3][skip + i]);
      }
    });
  }
}

template <typename T>
using AdamWBlock = void (*)(T*, const T*, T*, T*, T*, int64_t, const AdamWCoefficientsT<Math<T>>&,
                            const PieceRounding&);

// variants.template get<flags...>() for the runtime values of flags.
template <typename Variants, bool... kChosen>
auto select_variant(const Variants& variants) {
  return variants.template get<kChosen...>();
}

template <typename Variants, bool... kChosen, typename... Rest>
auto select_variant(const Variants& variants, bool flag, Rest... rest) {
  return flag ? select_variant<Variants, kChosen..., true>(variants, rest...)
              : select_variant<Variants, kChosen..., false>(variants, rest...);
}

// The L1 subgradient and the soft-threshold (l1_mode "proximal") exclude
// each other: gradient_transform zeroes the subgradient in proximal mode.
template <typename T>
struct SGDVariants {
  template <bool kStochastic, bool kMomentum, bool kFirstStep, bool kNesterov, bool kCoupledL2, bool kL1Subgradient,
            bool kL1Proximal>
  SGDBlock<T> get() const {
    if constexpr ((!kMomentum && (kFirstStep || kNesterov)) || (kL1Subgradient && kL1Proximal) ||
                  (kStochastic && std::is_same_v<T, double>)) {
      // never selected: without momentum both flags are cleared; the L1 modes
      // exclude each other; float64 is never rounded
      return nullptr;
    } else {
      return &sgd_block<T, kStochastic, kMomentum, kFirstStep, kNesterov, kCoupledL2, kL1Subgradient, kL1Proximal>;
    }
  }
};

template <typename T>
SGDBlock<T> select_sgd_block(const SGDCoefficientsT<Math<T>>& c, bool stochastic) {
  const bool momentum = c.has_momentum;
  return select_variant(SGDVariants<T>{}, stochastic, momentum, momentum && c.first_step, momentum && c.nesterov,
                        c.gradient.coupled_l2 != 0.0f, c.gradient.l1_subgradient != 0.0f, c.l1_threshold != 0.0f);
}

template <typename T>
struct AdamWVariants {
  template <bool kStochastic, bool kAmsgrad, bool kLerpFromStart, bool kCoupledL2, bool kL1Subgradient,
            bool kL1Proximal>
  AdamWBlock<T> get() const {
    if constexpr ((kL1Subgradient && kL1Proximal) || (kStochastic && std::is_same_v<T, double>)) {
      return nullptr;  // never selected: the L1 modes exclude each other; float64 is never rounded
    } else {
      return &adamw_block<T, kStochastic, kAmsgrad, kLerpFromStart, kCoupledL2, kL1Subgradient, kL1Proximal>;
    }
  }
};

// The flags are the same for every tensor of a call (only the step-dependent
// factors differ), so one variant serves them all.
template <typename T>
AdamWBlock<T> select_adamw_block(const AdamWCoefficientsT<Math<T>>& c, bool stochastic) {
  return select_variant(AdamWVariants<T>{}, stochastic, c.amsgrad, c.exp_avg_weight.from_start,
                        c.gradient.coupled_l2 != 0.0f, c.gradient.l1_subgradient != 0.0f, c.l1_threshold != 0.0f);
}

// Sum of squares with 16 independent accumulators (a plain float sum does
// not vectorize without reassociation), on float32 or bfloat16 bits in
// float32, on float64 in float64.
template <typename T>
REGOPS_CPU_CLONES double sum_of_squares(const T* __restrict__ x, int64_t n) {
  constexpr int kLanes = 16;
  Math<T> acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const Math<T> value = load_element(x, i + l);
      acc[l] += value * value;
    }
  }
  for (; i < n; ++i) {
    const Math<T> value = load_element(x, i);
    acc[0] += value * value;
  }
  Math<T> total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// float16 <-> float32 for the staged path.
REGOPS_CPU_CLONES
void half_to_float(const at::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

REGOPS_CPU_CLONES
void float_to_half(const float* __restrict__ src, at::Half* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
}

// --- the multi-tensor driver ----------------------------------------------------

// The tensors of one call laid end to end: tensor t occupies
// [starts[t], starts[t] + numel) of one index space, each start rounded up
// to kAlign so that a chunk boundary never splits a cache line of a tensor
// between two threads. Chunks are kChunk consecutive indices and may cover
// pieces of several small tensors; the gaps are never visited.
class TensorSpan {
 public:
  explicit TensorSpan(at::TensorList tensors) {
    starts_.reserve(tensors.size());
    numels_.reserve(tensors.size());
    for (const at::Tensor& t : tensors) {
      starts_.push_back(size_);
      numels_.push_back(t.numel());
      size_ += (t.numel() + kAlign - 1) / kAlign * kAlign;
    }
  }

  int64_t chunks() const { return (size_ + kChunk - 1) / kChunk; }

  // fn(tensor, begin, end) for each piece of tensor that lies in chunks
  // [first, last), in index order.
  template <typename Fn>
  void for_pieces(int64_t first, int64_t last, const Fn& fn) const {
    const int64_t lo = first * kChunk, hi = last * kChunk;
    // The last tensor starting at or before lo.
    int64_t t = std::upper_bound(starts_.begin(), starts_.end(), lo) - starts_.begin() - 1;
    for (t = std::max<int64_t>(t, 0); t < static_cast<int64_t>(starts_.size()) && starts_[t] < hi; ++t) {
      const int64_t begin = std::max(lo, starts_[t]) - starts_[t];
      const int64_t end = std::min(hi - starts_[t], numels_[t]);
      if (begin < end) fn(t, begin, end);
    }
  }

  // body(first, last) over ranges of chunks: at::parallel_for, which gives
  // each thread one contiguous range of equal length, or inline for little work.
  template <typename Body>
  void parallel_chunks(const Body& body) const {
    if (size_ < kSerialBelow) {
      body(0, chunks());
    } else {
      at::parallel_for(0, chunks(), 1, body);
    }
  }

 private:
  std::vector<int64_t> starts_;
  std::vector<int64_t> numels_;
  int64_t size_ = 0;
};

// The type the loops run on: float32, float64 and bfloat16 (as Bits16)
// directly, float16 through float32 blocks.
template <typename scalar_t>
using LoopType = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, Bits16,
                                    std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>;

// Runs block_fn(LoopType* views[kLists], n, tensor, first) over every element of
// the tensors of `lists` (lists[l][t] is tensor t of list l; list 1 holds the
// gradients, which are read only), in passes of at most kPass elements.
// float16 tensors are converted to float32 blocks of kBlock elements and the
// written lists converted back.
template <typename scalar_t, int kLists, typename BlockFn>
void apply_blocks(const std::array<at::TensorList, kLists>& lists, BlockFn block_fn) {
  const TensorSpan span(lists[0]);
  std::array<std::vector<scalar_t*>, kLists> pointers;
  for (int l = 0; l < kLists; ++l) {
    for (const at::Tensor& t : lists[l]) pointers[l].push_back(static_cast<scalar_t*>(t.data_ptr()));
  }
  span.parallel_chunks([&](int64_t first, int64_t last) {
    span.for_pieces(first, last, [&](int64_t tensor, int64_t begin, int64_t end) {
      if constexpr (!std::is_same_v<scalar_t, at::Half>) {
        for (int64_t start = begin; start < end; start += kPass) {
          std::array<LoopType<scalar_t>*, kLists> views;
          for (int l = 0; l < kLists; ++l) {
            views[l] = reinterpret_cast<LoopType<scalar_t>*>(pointers[l][tensor] + start);
          }
          block_fn(views, std::min(kPass, end - start), tensor, start);
        }
      } else {
        float buffers[kLists][kBlock];
        for (int64_t start = begin; start < end; start += kBlock) {
          const int64_t n = std::min(kBlock, end - start);
          std::array<float*, kLists> views;
          for (int l = 0; l < kLists; ++l) {
            half_to_float(pointers[l][tensor] + start, buffers[l], n);
            views[l] = buffers[l];
          }
          block_fn(views, n, tensor, start);
          for (int l = 0; l < kLists; ++l) {
            if (l != 1) float_to_half(buffers[l], pointers[l][tensor] + start, n);
          }
        }
      }
    });
  });
}

// 1 / grad_scale times the clip coefficient; false when found_inf says skip.
bool gradient_factor(const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<at::Tensor>& clip_coef, float& factor) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return false;
  factor = 1.0f;
  if (grad_scale.has_value()) factor = 1.0f / grad_scale->item<float>();
  if (clip_coef.has_value()) factor *= clip_coef->item<float>();
  return true;
}

// The key and the tensors' indices of a call's stochastic rounding; whether
// it rounds at all (16-bit parameters and a rounding argument).
struct CallRounding {
  bool stochastic = false;
  RoundingKey key{};
  std::vector<uint32_t> tensor_index;

  CallRounding(const c10::optional<at::Tensor>& rounding, at::TensorList params) {
    if (!rounding.has_value() || params.empty()) return;
    const at::ScalarType dtype = params[0].scalar_type();
    if (dtype != at::kBFloat16 && dtype != at::kHalf) return;
    const int64_t* r = rounding->const_data_ptr<int64_t>();
    stochastic = true;
    key = rounding_key(static_cast<uint64_t>(r[0]), static_cast<uint64_t>(r[1]), static_cast<uint64_t>(r[2]));
    for (size_t i = 0; i < params.size(); ++i) tensor_index.push_back(static_cast<uint32_t>(r[3 + i]));
  }

  PieceRounding piece(int64_t tensor, int64_t first) const {
    return PieceRounding{key, stochastic ? tensor_index[tensor] : 0u, first};
  }
};

// What sgd_step_ and adamw_step_ prepare alike once their arguments are
// checked: the rounding, the averages and the gradient's factor (skip: the
// step does nothing, as found_inf says).
struct StepCall {
  CallRounding rounding;
  CallAverages averages;
  float grad_factor = 1.0f;
  bool skip = false;

  StepCall(at::TensorList params, const StepExtras& extras)
      : rounding(extras.rounding, params),
        averages(extras.averages, extras.average_weights, extras.rounding.has_value()),
        skip(!gradient_factor(extras.grad_scale, extras.found_inf, extras.clip_coef, grad_factor)) {}

  // The rounding of elements [first, first + n) of tensor t and, once the
  // update has written them (the loop's view p), their averages.
  PieceRounding piece(int64_t t, int64_t first) const { return rounding.piece(t, first); }

  template <typename scalar_t, typename P>
  void average(const P* p, int64_t n, int64_t t, int64_t first) const {
    if (averages.present) averages.update<scalar_t>(p, n, t, first, rounding.piece(t, first));
  }
};

// The CPU kernels of the step ops, on the arguments OptimizerEntries has
// checked; a tensor lr is read on the host.
struct CpuOptimizers {
  static constexpr const char* kKernel = "CPU";

  static bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }

  static double host_lr(const char* op, const at::Tensor& lr) {
    TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "regops ", op, ": lr must be a one-element CPU tensor here");
    return lr.item<double>();
  }

  static const at::Tensor* device_lr(const at::Tensor&) { return nullptr; }

  static void sgd_step(const SGDStepArguments& a) {
    const StepCall call(a.params, a.extras);
    if (call.skip) return;
    dispatch_optimizer_dtype<true>("sgd_step_", a.params[0].scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using T = LoopType<scalar_t>;
      SGDCoefficientsT<Math<T>> c = make_sgd_coefficients<Math<T>>(
          a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov, a.maximize, a.l1, a.proximal, a.first_step);
      c.gradient.grad_factor *= call.grad_factor;  // keeps maximize's sign
      const SGDBlock<T> block = select_sgd_block<T>(c, call.rounding.stochastic);
      if (a.momentum != 0.0) {
        apply_blocks<scalar_t, 3>({a.params, a.grads, a.momentum_buffers},
                                  [&](const auto& v, int64_t n, int64_t t, int64_t first) {
          block(v[0], v[1], v[2], n, c, call.piece(t, first));
          call.average<scalar_t>(v[0], n, t, first);
        });
      } else {
        apply_blocks<scalar_t, 2>({a.params, a.grads}, [&](const auto& v, int64_t n, int64_t t, int64_t first) {
          block(v[0], v[1], nullptr, n, c, call.piece(t, first));
          call.average<scalar_t>(v[0], n, t, first);
        });
      }
    });
  }

  static void adamw_step(const AdamWStepArguments& a) {
    const StepCall call(a.params, a.extras);
    if (call.skip) return;
    // The step counts are incremented first, as torch does, and the bias
    // corrections computed from the new count in double.
    std::vector<double> counts;
    counts.reserve(a.params.size());
    for (const at::Tensor& step : a.state_steps) {
      float* count = step.mutable_data_ptr<float>();
      *count += 1.0f;
      counts.push_back(*count);
    }
    dispatch_optimizer_dtype<true>("adamw_step_", a.params[0].scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using T = LoopType<scalar_t>;
      std::vector<AdamWCoefficientsT<Math<T>>> coefficients;
      coefficients.reserve(a.params.size());
      for (double count : counts) {
        coefficients.push_back(adamw_coefficients<Math<T>>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.l2, a.l1,
                                                           a.proximal, a.amsgrad, a.maximize, count,
                                                           call.grad_factor));
      }
      const AdamWBlock<T> block = select_adamw_block<T>(coefficients[0], call.rounding.stochastic);
      if (a.amsgrad) {
        apply_blocks<scalar_t, 5>({a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs},
                                  [&](const auto& v, int64_t n, int64_t t, int64_t first) {
          block(v[0], v[1], v[2], v[3], v[4], n, coefficients[t], call.piece(t, first));
          call.average<scalar_t>(v[0], n, t, first);
        });
      } else {
        apply_blocks<scalar_t, 4>({a.params, a.grads, a.exp_avgs, a.exp_avg_sqs},
                                  [&](const auto& v, int64_t n, int64_t t, int64_t first) {
          block(v[0], v[1], v[2], v[3], nullptr, n, coefficients[t], call.piece(t, first));
          call.average<scalar_t>(v[0], n, t, first);
        });
      }
    });
  }
};

at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, bool squared) {
  const std::vector<at::Tensor> dense = dense_norm_inputs(tensors);
  TORCH_CHECK(dense[0].device().is_cpu(), "regops multi_tensor_norm: the CPU kernel got tensors on ",
              dense[0].device());
  at::Tensor result = at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  const TensorSpan span(dense);
  // One partial per chunk, summed in a fixed order: the result does not
  // depend on the number of threads.
  std::vector<double> partials(span.chunks(), 0.0);
  dispatch_optimizer_dtype<true>("multi_tensor_norm", tensors[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    span.parallel_chunks([&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        double sum = 0.0;
        span.for_pieces(chunk, chunk + 1, [&](int64_t tensor, int64_t begin, int64_t end) {
          const scalar_t* data = static_cast<const scalar_t*>(dense[tensor].data_ptr()) + begin;
          if constexpr (std::is_same_v<scalar_t, at::Half>) {
            float buffer[kBlock];
            for (int64_t start = 0; start < end - begin; start += kBlock) {
              const int64_t n = std::min(kBlock, end - begin - start);
              half_to_float(data + start, buffer, n);
              sum += sum_of_squares(buffer, n);
            }
          } else {
            sum += sum_of_squares(reinterpret_cast<const LoopType<scalar_t>*>(data), end - begin);
          }
        });
        partials[chunk] = sum;
      }
    });
  });
  double total = 0.0;
  for (double partial : partials) total += partial;
  result.fill_(squared ? total : std::sqrt(total));
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  register_step_ops<CpuOptimizers>(m);
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
}

}  // namespace regops
