// The log-probs math shared by the C++ (CPU) and CUDA kernels: the logit transform and the
// backward of one entry. With x = logits / T (see LogitTransform), log p_v = x_v - lse:
//   d/dx_v [g_logp logp + g_entropy H] = g_logp ([v == y] - p_v) - g_entropy p_v (log p_v + H),
// and d/dlogits = (d/dx) / T. Each caller supplies p_v = exp(log p_v) with its own exp.
#pragma once

#include <cmath>
#include <cstdint>

#include "row_layout.h"  // PPO_FAST_HOST_DEVICE

namespace ppo_fast {

// A product rounded on its own, never fused with a following add into an FMA (nvcc fuses by
// default): x = z inv_t must be the same value wherever a kernel forms it, since x - max x is
// taken from it (the C++ build passes -ffp-contract=off for the same reason).
PPO_FAST_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// x = z inv_t, or with a softcap c: x = c tanh(scale z / c) inv_t (final-logit softcapping; without
// a softcap the scale is folded into inv_t by the caller). dx/dz = scale (1 - tanh^2) inv_t.
struct LogitTransform {
  float inv_t, scale, softcap;
  bool has_softcap;

  PPO_FAST_HOST_DEVICE float tanh_of(float z) const { return tanhf(scale * z / softcap); }
  PPO_FAST_HOST_DEVICE float apply(float z) const {
    return has_softcap ? mul_rn(softcap * tanh_of(z), inv_t) : mul_rn(z, inv_t);
  }
  PPO_FAST_HOST_DEVICE float slope(float z) const {
    if (!has_softcap) return inv_t;
    const float t = tanh_of(z);
    return scale * (1.0f - t * t) * inv_t;
  }
};

// Gradient at one entry from its entropy term p (log p_v + H), to x times dx/dz = `slope`;
// indicator = [v == y], so at the label [v == y] - p is 1 - p in fp32. V: float, or a vector of
// floats (the C++ kernels' at::vec::Vectorized), whose caller forms the entropy term with its select.
template <typename V>
PPO_FAST_HOST_DEVICE V logprobs_grad_of(V p, V entropy_term, V indicator, V g_logp, V g_entropy, V slope) {
  return ((indicator - p) * g_logp - g_entropy * entropy_term) * slope;
}

// The same for one float entry; p = 0 (a logit of -inf) contributes 0 to the entropy term, not
// 0 * inf = NaN.
PPO_FAST_HOST_DEVICE float logprobs_grad(float logp_v, float p, float indicator, float g_logp, float g_entropy,
                                         float entropy, float slope) {
  const float entropy_term = p > 0.0f ? p * (logp_v + entropy) : 0.0f;
  return logprobs_grad_of(p, entropy_term, indicator, g_logp, g_entropy, slope);
}

}  // namespace ppo_fast
