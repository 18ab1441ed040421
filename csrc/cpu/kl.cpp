// KL penalty estimators and KL-shaped token rewards on the CPU (math: ppo_fast/ops/kl.py).
// Elementwise lane loops (`omp simd`, exp_in_range) over contiguous float32 tensors; the estimator is
// a template parameter.
#include <cmath>
#include <limits>

#include "cpu_checks.h"
#include "fast_math.h"
#include "lanes.h"
#include "ops.h"
#include "ppo_constants.h"

namespace ppo_fast {
namespace {

// The estimator's value at d = log_prob - ref; Straight ('+' suffix): NaN where k2 is infinite.
template <int Estimator, bool Straight>
__attribute__((always_inline)) inline float kl_value(float log_prob, float ref) {
  const float diff = log_prob - ref;
  float value;
  if constexpr (Estimator == kKlK1) {
    value = diff;
  } else if constexpr (Estimator == kKlAbs) {
    value = std::fabs(diff);
  } else if constexpr (Estimator == kKlK2) {
    value = 0.5f * diff * diff;
  } else {
    const float kappa = clamp_to(ref - log_prob, -kLogRatioClamp, kLogRatioClamp);
    const float raw = exp_in_range(kappa) - kappa - 1.0f;
    value = Estimator == kKlK3Raw ? raw : clamp_to(raw, -kK3Clamp, kK3Clamp);
  }
  if constexpr (Straight) {
    const float k2 = 0.5f * diff * diff;
    value = k2 < std::numeric_limits<float>::infinity() ? value : std::numeric_limits<float>::quiet_NaN();
  }
  return value;
}

// d value / d log_prob (d / d ref is its negative); outside a clamp, 0.
template <int Estimator>
__attribute__((always_inline)) inline float kl_grad(float log_prob, float ref) {
  const float diff = log_prob - ref;
  if constexpr (Estimator == kKlK1) {
    return 1.0f;
  } else if constexpr (Estimator == kKlAbs) {
    return diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f);
  } else if constexpr (Estimator == kKlK2) {
    return diff;
  } else {
    const float raw = ref - log_prob;
    const float kappa = clamp_to(raw, -kLogRatioClamp, kLogRatioClamp);
    const float e = exp_in_range(kappa), value = e - kappa - 1.0f;
    const float slope = kappa == raw ? 1.0f - e : 0.0f;  // 0 outside the clamp of k (and for NaN)
    return Estimator == kKlK3Raw ? slope : (value <= kK3Clamp ? slope : 0.0f);  // value >= 0 always
  }
}

template <int Estimator, bool Straight>
void kl_values(const float* lp, const float* ref, float* out, int64_t n) {
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = kl_value<Estimator, Straight>(lp[i], ref[i]);
  });
}

template <int Estimator>
void kl_grads(const float* lp, const float* ref, const float* up, float* g_lp, float* g_ref, int64_t n) {
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float g = up[i] * kl_grad<Estimator>(lp[i], ref[i]);
      if (g_lp) g_lp[i] = g;
      if (g_ref) g_ref[i] = -g;
    }
  });
}

template <typename Fn>
void by_estimator(int64_t code, Fn&& fn) {
  switch (code) {
    case kKlK1: return fn(std::integral_constant<int, kKlK1>{});
    case kKlAbs: return fn(std::integral_constant<int, kKlAbs>{});
    case kKlK2: return fn(std::integral_constant<int, kKlK2>{});
    case kKlK3: return fn(std::integral_constant<int, kKlK3>{});
    case kKlK3Raw: return fn(std::integral_constant<int, kKlK3Raw>{});
    default: TORCH_CHECK(false, "unknown KL estimator code ", code);
  }
}

void check_pair(const at::Tensor& log_prob, const at::Tensor& ref) {
  TORCH_CHECK(log_prob.scalar_type() == at::kFloat && ref.scalar_type() == at::kFloat && log_prob.is_contiguous() &&
                  ref.is_contiguous() && log_prob.sizes() == ref.sizes(),
              "kl: expected contiguous float32 log_prob and ref_log_prob of one shape, got ", log_prob.sizes(), " ",
              ref.sizes());
}

// One row of compute_rewards: -kl_coef KL m, plus the score on the last valid token.
template <int Estimator, bool Straight, typename mask_t>
void reward_row(const float* lp, const float* ref, const mask_t* m, float score, int64_t T, float coef, float* out) {
  int64_t last = -1;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (mask_value(m[t]) != 0.0f) {
      last = t;
      break;
    }
  }
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    const float mt = mask_value(m[t]), lp_raw = lp[t], ref_raw = ref[t];
    const float kl = kl_value<Estimator, Straight>(mt != 0.0f ? lp_raw : 0.0f, mt != 0.0f ? ref_raw : 0.0f);
    out[t] = -coef * kl * mt + (t == last ? score : 0.0f);
  }
}

}  // namespace

at::Tensor kl_forward(const at::Tensor& log_prob, const at::Tensor& ref, int64_t estimator, bool straight) {
  check_pair(log_prob, ref);
  at::Tensor out = at::empty_like(log_prob);
  const float *lp = log_prob.data_ptr<float>(), *r = ref.data_ptr<float>();
  float* o = out.data_ptr<float>();
  by_estimator(estimator, [&](auto code) {
    straight ? kl_values<decltype(code)::value, true>(lp, r, o, log_prob.numel())
             : kl_values<decltype(code)::value, false>(lp, r, o, log_prob.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kl_backward(const at::Tensor& log_prob, const at::Tensor& ref,
                                               const at::Tensor& upstream, int64_t grad_code, bool want_log_prob,
                                               bool want_ref) {
  check_pair(log_prob, ref);
  check_pair(log_prob, upstream);
  at::Tensor g_lp = want_log_prob ? at::empty_like(log_prob) : at::Tensor();
  at::Tensor g_ref = want_ref ? at::empty_like(ref) : at::Tensor();
  by_estimator(grad_code, [&](auto code) {
    kl_grads<decltype(code)::value>(log_prob.data_ptr<float>(), ref.data_ptr<float>(), upstream.data_ptr<float>(),
                                    want_log_prob ? g_lp.data_ptr<float>() : nullptr,
                                    want_ref ? g_ref.data_ptr<float>() : nullptr, log_prob.numel());
  });
  return {g_lp, g_ref};
}

at::Tensor compute_rewards_forward(const at::Tensor& scores, const at::Tensor& log_prob, const at::Tensor& ref,
                                   const at::Tensor& mask, double kl_coef, int64_t estimator, bool straight) {
  const auto shape = check_f32_rows({{log_prob, "log_prob"}, {ref, "ref_log_prob"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.numel() == B,
              "scores: expected a contiguous float32 [B] tensor, got ", scores.sizes());
  at::Tensor out = at::empty_like(log_prob);
  const float *lp = log_prob.data_ptr<float>(), *r = ref.data_ptr<float>(), *s = scores.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float coef = static_cast<float>(kl_coef);
  const bool bool_mask = mask.scalar_type() == at::kBool;
  by_estimator(estimator, [&](auto code) {
    constexpr int E = decltype(code)::value;
    at::parallel_for(0, B, rows_per_task(B, T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t at = b * T;
        if (bool_mask) {
          const uint8_t* m = static_cast<const uint8_t*>(mask.data_ptr()) + at;
          straight ? reward_row<E, true>(lp + at, r + at, m, s[b], T, coef, o + at)
                   : reward_row<E, false>(lp + at, r + at, m, s[b], T, coef, o + at);
        } else {
          const float* m = mask.data_ptr<float>() + at;
          straight ? reward_row<E, true>(lp + at, r + at, m, s[b], T, coef, o + at)
                   : reward_row<E, false>(lp + at, r + at, m, s[b], T, coef, o + at);
        }
      }
    });
  });
  return out;
}

}  // namespace ppo_fast
