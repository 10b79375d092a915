// Shared by the C++ CPU kernels: the vectorisation clones and an exp that vectorises.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// The hot loops are compiled for AVX-512 and AVX2 as well as the baseline, picked at load time by the CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DK_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DK_VECTOR_CLONES
#endif

// Helpers called from a DK_VECTOR_CLONES function are forced inline, so that each clone compiles them for its own
// instruction set (a helper that stayed a call would run the baseline code).
#if defined(__GNUC__)
#define DK_INLINE inline __attribute__((always_inline))
#else
#define DK_INLINE inline
#endif

namespace dk {

// exp for the fp32 path that the compiler vectorises inside `omp simd` loops (a libm call stays scalar): Cephes'
// expf. n = round(x / ln 2) through the 1.5 * 2^23 rounding trick (plain adds), r = x - n ln 2 in two parts, a
// degree-7 polynomial for e^r, and 2^n written into the exponent bits; within 1 ulp for x <= 0 (callers pass a
// shifted score u - max(u), or one a rounding error above 0). Below ln(FLT_MIN) the result is 0 (so exp(-inf) =
// 0), and NaN stays NaN. The underflow is applied as a bit mask rather than a float select or clamp, which GCC
// would not if-convert under its default -ftrapping-math.
DK_INLINE float exp_acc(float x) {
  constexpr float kLow = -87.33654f;  // ln(FLT_MIN)
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to an integer
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t scale_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float value = y * scale;
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= -static_cast<int32_t>(!(x < kLow));
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

DK_INLINE double exp_acc(double x) { return std::exp(x); }

}  // namespace dk
