// Vector helpers of the CPU kernels: per-ISA clones, channel vectors, setup lanes, horizontal sums.
//
// No -march flags: the entry points of forward.cpp and backward.cpp are compiled once per instruction set with
// `target_clones` and the loader picks the clone for the running CPU (AVX-512, AVX2+FMA, or baseline x86-64).
// Everything the entry points call is forced inline, so each clone compiles it with its own vector width; the
// vectors are GCC/Clang vector extensions, which every clone lowers to its own instructions.
// Torch-light (c10's BFloat16 only), so host test programs can include it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MSDA_NO_MULTIVERSIONING)
#define MSDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MSDA_HAVE_CLONES 1
#else
#define MSDA_CPU_CLONES
#define MSDA_HAVE_CLONES 0
#endif

#if defined(__GNUC__) || defined(__clang__)
// Inlined into each instruction-set clone, so the body is compiled for that clone's vector width.
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

// Head-dim specialisations of a kernel template FUNC<scalar_t, kHeadDim> (a compile-time head_dim gives fully
// unrolled channel loops held in registers); any other head_dim runs the runtime-size loops (kHeadDim = 0).
// A macro, not a function taking a lambda: the call must stay inside the cloned entry point to get its ISA.
#define MSDA_DISPATCH_HEAD_DIM(head_dim, FUNC, ...) \
  switch (head_dim) {                               \
    case 32:                                        \
      FUNC<scalar_t, 32>(__VA_ARGS__);              \
      break;                                        \
    case 64:                                        \
      FUNC<scalar_t, 64>(__VA_ARGS__);              \
      break;                                        \
    case 16:                                        \
      FUNC<scalar_t, 16>(__VA_ARGS__);              \
      break;                                        \
    default:                                        \
      FUNC<scalar_t, 0>(__VA_ARGS__);               \
  }

namespace mask2former {
namespace msda {

// Accumulation type: bf16 inputs accumulate in fp32, fp32 and fp64 in themselves.
template <typename scalar_t>
struct AccType {
  using type = scalar_t;
};

template <>
struct AccType<c10::BFloat16> {
  using type = float;
};

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_HAVE_VECTOR_EXTENSIONS 1
// Channel vectors of 32 bytes: one AVX register on AVX2/AVX-512, two SSE registers on baseline x86-64, NEON
// elsewhere.
// fp32 and fp64: loads and stores of the element type itself (8 or 4 lanes).
template <typename scalar_t>
struct ChannelVector {
  using acc_t = scalar_t;
  typedef scalar_t vec_t __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / static_cast<int>(sizeof(scalar_t));
  static MSDA_ALWAYS_INLINE vec_t load(const scalar_t* row) {
    vec_t result;
    std::memcpy(&result, row, sizeof(result));
    return result;
  }
  static MSDA_ALWAYS_INLINE void store(scalar_t* row, vec_t vector) { std::memcpy(row, &vector, sizeof(vector)); }
};

// bf16: loaded into fp32 lanes, rounded back on store.
template <>
struct ChannelVector<c10::BFloat16> {
  using acc_t = float;
  typedef float vec_t __attribute__((vector_size(32)));
  typedef uint16_t half_bits_t __attribute__((vector_size(16)));
  typedef uint32_t bits_t __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  // bf16 is the top half of an fp32: widen the bits and shift them up.
  static MSDA_ALWAYS_INLINE vec_t load(const c10::BFloat16* row) {
    half_bits_t half_bits;
    std::memcpy(&half_bits, row, sizeof(half_bits));
    const bits_t bits = __builtin_convertvector(half_bits, bits_t) << 16;
    vec_t result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
  }
  static MSDA_ALWAYS_INLINE void store(c10::BFloat16* row, vec_t vector) {
    for (int lane = 0; lane < kLanes; ++lane) row[lane] = c10::BFloat16(vector[lane]);  // round to nearest even
  }
};

template <typename vec_t, int kLanes>
MSDA_ALWAYS_INLINE auto horizontal_sum(vec_t vector) -> decltype(vector[0] + vector[0]) {
  decltype(vector[0] + vector[0]) sum = 0;
  for (int lane = 0; lane < kLanes; ++lane) sum += vector[lane];  // fixed order: deterministic
  return sum;
}

typedef float float8_t __attribute__((vector_size(32)));

// The lane sums of four 8-lane float vectors, in lanes 0-3 of the result: two rounds of pairwise adds across the
// four vectors at once (a fixed order: deterministic), instead of four sequential 8-lane reductions.
MSDA_ALWAYS_INLINE float8_t horizontal_sums_of_four(float8_t a, float8_t b, float8_t c, float8_t d) {
  // [a0+a1, b0+b1, a2+a3, b2+b3, a4+a5, b4+b5, a6+a7, b6+b7]
  const float8_t ab = __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
                      __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  const float8_t cd = __builtin_shufflevector(c, d, 0, 8, 2, 10, 4, 12, 6, 14) +
                      __builtin_shufflevector(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
  // [a0..3, b0..3, c0..3, d0..3, a4..7, b4..7, c4..7, d4..7] (each a sum of four lanes)
  const float8_t quarter = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                           __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
  return quarter + __builtin_shufflevector(quarter, quarter, 4, 5, 6, 7, 0, 1, 2, 3);
}
#else
#define MSDA_HAVE_VECTOR_EXTENSIONS 0
#endif

// Lanes of the per-sample setup: 32-byte vectors of acc_t and of a same-width integer (the type of a comparison
// result), so every clone computes 8 (fp32) or 4 (fp64) samples per step with its own instructions.
template <typename acc_t>
struct SetupLanes {
  static constexpr int kLanes = 32 / static_cast<int>(sizeof(acc_t));
  using int_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef acc_t vec_t __attribute__((vector_size(32)));
  typedef int_t ivec_t __attribute__((vector_size(32)));
};

template <typename vec_t, typename element_t>
MSDA_ALWAYS_INLINE vec_t load_vector(const element_t* data) {
  vec_t result;
  std::memcpy(&result, data, sizeof(result));
  return result;
}

template <typename vec_t, typename element_t>
MSDA_ALWAYS_INLINE void store_vector(element_t* data, vec_t vector) {
  std::memcpy(data, &vector, sizeof(vector));
}

// Rounds a count up to whole setup vectors (the setup arrays are padded so the last vector needs no tail loop).
template <typename acc_t>
constexpr int64_t padded_count(int64_t count) {
  constexpr int64_t lanes = SetupLanes<acc_t>::kLanes;
  return (count + lanes - 1) / lanes * lanes;
}

}  // namespace msda
}  // namespace mask2former
