// The per-token math of the compiled policy objectives (ppo_fast/ops/objectives.py: clip with its
// dual clip, cispo, gpg, sapo), shared by the C++ kernels and any CUDA kernel: one copy of each
// surrogate's value and derivatives. The exp is the caller's (the C++ kernels pass their
// vectorisable fast_exp), so this header needs neither ATen nor the CUDA runtime.
#pragma once

#include "ppo_constants.h"
#include "row_layout.h"  // PPO_FAST_HOST_DEVICE

namespace ppo_fast {

// Written as chains of selects on floats (no ||, no | of bools): GCC then vectorises the lane
// loops that call them, on every ISA build (checked with -fopt-info-vec). max / clamp keep a NaN
// (std::max drops a NaN first argument; the reference's torch.maximum / torch.clamp do not).
PPO_FAST_HOST_DEVICE float nan_max(float a, float b) {
  const float m = a > b ? a : b;
  return a != a ? a : m;
}

// x clamped to bounds that are never NaN (the objective's constants): a NaN x stays NaN.
PPO_FAST_HOST_DEVICE float clamp_to(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// An objective's constants as the kernels take them: the ratio's range [lo, hi] = [1 - clip_low,
// 1 + clip_high], the dual clip's bound (+inf without one) and SAPO's temperatures.
struct SurrogateConstants {
  float lo, hi, dual, tau_pos, tau_neg;
};

// A token's loss L, w dL/drho, w dL/dlog_prob (the derivative held directly), and whether it is
// clipped / dual-clipped (1 or 0). The weight w multiplies a derivative only where the surrogate
// has one: a clipped token's gradient is 0 even for w = inf, as autograd of the reference gives.
struct TokenTerms {
  float loss, d_ratio, d_log_prob, clipped, lower;
};

constexpr float kInfinity = __builtin_huge_valf();  // std::numeric_limits is host-only for nvcc

// clip   L = max(-A rho, -A c(rho)), at most -A dual where A < 0       dL/drho = -A where unclipped
// cispo  L = -sg[c(rho)] A log_prob                                     dL/dlog_prob = -c(rho) A
// gpg    L = -A log_prob                                                dL/dlog_prob = -A
// sapo   L = -A (4/tau) sigmoid(z), z = tau (rho - 1)                   dL/drho = -4 A sigmoid(z) sigmoid(-z)
// Each select is on one comparison, so the lane loops vectorise.
template <int Surrogate, typename Exp>
PPO_FAST_HOST_DEVICE TokenTerms surrogate(float ratio, float log_prob, float adv, float w, const SurrogateConstants& c,
                                          Exp exp) {
  if constexpr (Surrogate == kSurrogateClip) {
    const float l1 = -adv * ratio, l2 = -adv * clamp_to(ratio, c.lo, c.hi), loss = nan_max(l1, l2);
    // the dual clip's bound, +inf where it does not apply (A >= 0, or no dual clip): one comparison
    // (GCC turns a select between comparisons into bool logic it cannot vectorise)
    const float dual_loss = adv < 0 ? -adv * c.dual : kInfinity;
    const bool dual = loss > dual_loss;
    // no gradient where the clipped term wins; a NaN term (no order) keeps it, NaN (as autograd)
    return {dual ? dual_loss : loss, dual ? 0.0f : (l2 > l1 ? 0.0f : -adv * w), 0.0f, l2 > l1 ? 1.0f : 0.0f,
            dual ? 1.0f : 0.0f};
  } else if constexpr (Surrogate == kSurrogateCispo) {
    const float capped = clamp_to(ratio, c.lo, c.hi);
    return {-capped * adv * log_prob, 0.0f, -capped * adv * w, ratio != capped ? 1.0f : 0.0f, 0.0f};
  } else if constexpr (Surrogate == kSurrogateGpg) {
    return {-adv * log_prob, 0.0f, -adv * w, 0.0f, 0.0f};
  } else {  // sapo
    const float tau = adv > 0 ? c.tau_pos : c.tau_neg;
    const float gate = 1.0f / (1.0f + exp(-tau * (ratio - 1.0f)));
    return {-adv * gate * (4.0f / tau), -4.0f * adv * w * gate * (1.0f - gate), 0.0f, 0.0f, 0.0f};
  }
}

}  // namespace ppo_fast
