// The log-probs backward for one row, shared by the C++ (CPU) and CUDA kernels.
// With x = logits / T, log p_v = x_v - lse:
//   d/dx_v [g_logp logp + g_entropy H] = g_logp ([v == y] - p_v) - g_entropy p_v (log p_v + H),
// and d/dlogits = (d/dx) / T. Each caller supplies p_v = exp(log p_v) with its own exp.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PPO_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PPO_FAST_HOST_DEVICE inline
#endif

namespace ppo_fast {

struct LogprobsRowGrad {
  int64_t label;  // -1 without labels
  float g_logp, g_entropy, entropy, lse, inv_t;

  PPO_FAST_HOST_DEVICE LogprobsRowGrad(int64_t row, const int64_t* labels, const float* lse_in,
                                       const float* entropy_in, const float* grad_logp, const float* grad_entropy,
                                       float inv_temperature, int64_t ignore_index)
      : label(labels ? labels[row] : -1),
        g_logp((grad_logp && label != ignore_index && label >= 0) ? grad_logp[row] : 0.0f),
        g_entropy(grad_entropy ? grad_entropy[row] : 0.0f),
        entropy(grad_entropy ? entropy_in[row] : 0.0f),
        lse(lse_in[row]),
        inv_t(inv_temperature) {}

  PPO_FAST_HOST_DEVICE float logp_at(float logit) const { return logit * inv_t - lse; }

  PPO_FAST_HOST_DEVICE float entropy_term(float logp_v, float p) const {
    return p > 0.0f ? p * (logp_v + entropy) : 0.0f;  // p = 0 (logit -inf) gives 0, not NaN
  }

  // Gradient at an entry other than the label, given log p_v and p_v.
  PPO_FAST_HOST_DEVICE float grad_other(float logp_v, float p) const {
    return (-p * g_logp - g_entropy * entropy_term(logp_v, p)) * inv_t;
  }

  // Gradient at entry v; at the label, [v == y] - p_v is formed as 1 - p in fp32.
  PPO_FAST_HOST_DEVICE float grad_at(int64_t v, float logp_v, float p) const {
    if (v != label) return grad_other(logp_v, p);
    return ((1.0f - p) * g_logp - g_entropy * entropy_term(logp_v, p)) * inv_t;
  }
};

}  // namespace ppo_fast
