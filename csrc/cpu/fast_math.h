// Branch-free float math that GCC/Clang auto-vectorise at -O3 (no -ffast-math: inf and NaN
// keep their IEEE meaning). Always inlined: a call inside a lane loop (`omp simd`) would keep
// the loop scalar (and go through the PLT, the extension being a shared object).
#pragma once

#include <cstdint>
#include <limits>

namespace ppo_fast {

namespace exp_detail {
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t + kRound - kRound rounds t to an integer
constexpr float kLo = -87.33654475f;   // ln 2^-126: below, 2^n leaves the normal range (exp -> 0)
constexpr float kHi = 88.72283905f;    // ln FLT_MAX: above, exp -> inf

// exp(x) = 2^n exp(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes expf: a degree-7 polynomial, ln2 in
// two parts, Cody-Waite). Returns exp(r) and sets n, read from the bits of x / ln2 + kRound (no
// float -> int conversion, so NaN is defined: exp(r) is NaN then).
__attribute__((always_inline)) inline float exp_reduced(float x, int32_t& n) {
  const float t = x * 1.44269504088896341f + kRound;
  const float nf = t - kRound;
  n = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, kRound);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

__attribute__((always_inline)) inline float pow2(int32_t n) {  // 2^n, -126 <= n <= 127
  return __builtin_bit_cast(float, (n + 127) << 23);
}
}  // namespace exp_detail

// exp(x) for kLo <= x <= 88 (and exp(NaN) = NaN), within 2 ulp (tests/ops/test_cpu_kernels.py):
// for arguments a kernel has clamped already (log-ratios to +-20), ~20 vector instructions.
__attribute__((always_inline)) inline float exp_in_range(float x) {
  int32_t n;
  const float y = exp_detail::exp_reduced(x, n);
  return y * exp_detail::pow2(n);
}

// exp(x) for every float: 0 below ln 2^-126 (no subnormal results), inf above ln FLT_MAX, NaN for
// NaN, within 2 ulp elsewhere. Near the top 2^n would pass 2^127, so it is applied as 2^(n-1) 2.
__attribute__((always_inline)) inline float fast_exp(float x) {
  using namespace exp_detail;
  const float inside = x < kLo ? kLo : (x > kHi ? kHi : x);  // NaN stays NaN
  int32_t n;
  const float y = exp_reduced(inside, n);
  const int32_t top = n > 127 ? 1 : 0;
  const float value = y * pow2(n - top) * (top ? 2.0f : 1.0f);
  return x < kLo ? 0.0f : (x > kHi ? std::numeric_limits<float>::infinity() : value);
}

}  // namespace ppo_fast
