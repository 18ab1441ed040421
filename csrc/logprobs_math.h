// The log-probs backward for one row, shared by the C++ (CPU) and CUDA kernels.
// With x = logits / T, log p_v = x_v - lse:
//   d/dx_v [g_logp logp + g_entropy H] = g_logp ([v == y] - p_v) - g_entropy p_v (log p_v + H),
// and d/dlogits = (d/dx) / T. Each caller supplies p_v = exp(log p_v) with its own exp.
#pragma once

#include <cstdint>

#include "row_layout.h"  // PPO_FAST_HOST_DEVICE

namespace ppo_fast {

// Gradient at one entry; indicator = [v == y], so at the label [v == y] - p is 1 - p in fp32.
// p = 0 (a logit of -inf) contributes 0 to the entropy term, not 0 * inf = NaN.
PPO_FAST_HOST_DEVICE float logprobs_grad(float logp_v, float p, float indicator, float g_logp, float g_entropy,
                                         float entropy, float inv_t) {
  const float entropy_term = p > 0.0f ? p * (logp_v + entropy) : 0.0f;
  return ((indicator - p) * g_logp - g_entropy * entropy_term) * inv_t;
}

}  // namespace ppo_fast
