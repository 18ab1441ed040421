// Branch-free float math that GCC/Clang auto-vectorise at -O3 (no -ffast-math: inf and NaN
// keep their IEEE meaning).
#pragma once

#include <cstdint>
#include <cstring>

namespace ppo_fast {

// exp(x) for float, ~1 ulp (Cephes expf): x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by a degree-7 polynomial, 2^n assembled in the exponent bits. exp(-inf) = 0,
// exp(NaN) = NaN (the NaN goes around the integer conversion, which it would make undefined).
inline float fast_exp(float x) {
  constexpr float kHi = 88.0f, kLo = -87.3f;
  const float xc = x > kHi ? kHi : (x < kLo ? kLo : (x != x ? 0.0f : x));
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;  // Cody-Waite ln2 split
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kLo ? 0.0f : (x != x ? x : y * scale);
}

}  // namespace ppo_fast
