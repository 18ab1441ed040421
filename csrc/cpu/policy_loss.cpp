// The policy objective on the CPU (math: ppo_fast/ops/policy_loss.py): the clip / cispo / gpg /
// sapo surrogates on a token, sequence or sequence-token ratio, with optional importance weights.
// Inputs arrive as contiguous float32 [B, T]; one task per row, row sums accumulated in double.
// Inputs at masked positions are read as 0 and max/clamp propagate NaN, as the reference does.
// The surrogate and the ratio level are template parameters: no branch on them per token.
#include <cmath>

#include "cpu_checks.h"
#include "ops.h"
#include "ppo_constants.h"

namespace ppo_fast {
namespace {

struct Constants {
  float lo, hi, dual, tau_pos, tau_neg;
  bool has_dual;
};

struct TokenTerms {
  float loss, d_ratio, d_log_prob, clipped, lower;
};

template <int Surrogate>
TokenTerms surrogate(float ratio, float log_prob, float adv, const Constants& c) {
  if constexpr (Surrogate == kSurrogateClip) {
    const float l1 = -adv * ratio, l2 = -adv * nan_clamp(ratio, c.lo, c.hi);
    TokenTerms t{nan_max(l1, l2), l1 >= l2 ? -adv : 0.0f, 0.0f, l2 > l1 ? 1.0f : 0.0f, 0.0f};
    if (c.has_dual && adv < 0 && t.loss > -adv * c.dual) t.loss = -adv * c.dual, t.d_ratio = 0.0f, t.lower = 1.0f;
    return t;
  } else if constexpr (Surrogate == kSurrogateCispo) {
    const float w = nan_clamp(ratio, c.lo, c.hi);
    return {-w * adv * log_prob, 0.0f, -w * adv, ratio != w ? 1.0f : 0.0f, 0.0f};
  } else if constexpr (Surrogate == kSurrogateGpg) {
    return {-adv * log_prob, 0.0f, -adv, 0.0f, 0.0f};
  } else {  // sapo
    const float tau = adv > 0 ? c.tau_pos : c.tau_neg;
    const float gate = 1.0f / (1.0f + std::exp(-tau * (ratio - 1.0f)));
    return {-adv * gate * (4.0f / tau), -4.0f * adv * gate * (1.0f - gate), 0.0f, 0.0f, 0.0f};
  }
}

struct Rows {
  const float *lp, *old, *A, *m, *w;  // w: nullptr, or importance weights with strides (w_row, w_t)
  int64_t T, w_row, w_t;
  float* dloss;  // nullptr without a gradient
  float* stats;
};

template <int Surrogate, int Level>
void policy_row(const Rows& in, int64_t b, const Constants& c) {
  const int64_t T = in.T;
  const float* m = in.m + b * T;
  float seq_ratio = 1.0f;
  bool seq_inside = true;
  double n = 0;
  if constexpr (Level != kRatioToken) {  // pass 1: s = exp(clamp(mean log-ratio))
    double delta_sum = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      if (m[t] != 0.0f) delta_sum += in.lp[i] - in.old[i];
      n += m[t];
    }
    const float mean = static_cast<float>(delta_sum / (n > 1 ? n : 1));
    seq_ratio = std::exp(nan_clamp(mean, -kLogRatioClamp, kLogRatioClamp));
    seq_inside = mean >= -kLogRatioClamp && mean <= kLogRatioClamp;
  }
  double loss_sum = 0, count = 0, clipped = 0, neg_delta = 0, lower_sum = 0, ratio_grad = 0;
  for (int64_t t = 0; t < T; ++t) {  // pass 2: the losses
    const int64_t i = b * T + t;
    const bool valid = m[t] != 0.0f;
    const float adv = valid ? in.A[i] : 0.0f, lp = valid ? in.lp[i] : 0.0f;
    const float raw = valid ? lp - in.old[i] : 0.0f;
    const float w = !valid ? 0.0f : in.w ? m[t] * in.w[b * in.w_row + t * in.w_t] : m[t];
    const float delta = nan_clamp(raw, -kLogRatioClamp, kLogRatioClamp);
    const float ratio = Level == kRatioToken ? std::exp(delta) : seq_ratio;
    const bool inside = Level == kRatioToken ? (raw >= -kLogRatioClamp && raw <= kLogRatioClamp) : seq_inside;
    const TokenTerms term = surrogate<Surrogate>(ratio, lp, adv, c);
    if (in.dloss) {
      if constexpr (Level == kRatioSequence) {
        if (valid) ratio_grad += w * term.d_ratio;
        in.dloss[i] = valid ? w * term.d_log_prob : 0.0f;
      } else {
        in.dloss[i] = valid ? w * ((inside ? term.d_ratio * ratio : 0.0f) + term.d_log_prob) : 0.0f;
      }
    }
    if (valid) loss_sum += w * term.loss;
    count += m[t];
    clipped += m[t] * term.clipped;
    neg_delta -= m[t] * delta;
    lower_sum += m[t] * term.lower;
  }
  if constexpr (Level == kRatioSequence) {  // pass 3: d s / d log_prob_t = s / n to every valid token
    if (in.dloss) {
      const float coef = seq_inside ? static_cast<float>(seq_ratio / (n > 1 ? n : 1) * ratio_grad) : 0.0f;
      for (int64_t t = 0; t < T; ++t)
        if (m[t] != 0.0f) in.dloss[b * T + t] += m[t] * coef;
    }
  }
  float* s = in.stats + b * kPolicyRowStats;
  s[kRowLoss] = loss_sum, s[kRowTokens] = count, s[kRowClipped] = clipped;
  s[kRowNegLogRatio] = neg_delta, s[kRowLowerClipped] = lower_sum;
}

template <int Surrogate, int Level>
void policy_rows(const Rows& in, int64_t B, const Constants& c) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) policy_row<Surrogate, Level>(in, b, c);
  });
}

template <int Surrogate>
void dispatch_level(int64_t level, const Rows& in, int64_t B, const Constants& c) {
  switch (level) {
    case kRatioToken: return policy_rows<Surrogate, kRatioToken>(in, B, c);
    case kRatioSequence: return policy_rows<Surrogate, kRatioSequence>(in, B, c);
    case kRatioSequenceToken: return policy_rows<Surrogate, kRatioSequenceToken>(in, B, c);
    default: TORCH_CHECK(false, "policy_loss_forward: unknown ratio level code ", level);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> policy_loss_forward(const at::Tensor& log_prob, const at::Tensor& old_log_prob,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       const std::optional<at::Tensor>& is_weights,
                                                       int64_t surrogate, int64_t ratio_level, double clip_low,
                                                       double clip_high, std::optional<double> dual_clip,
                                                       double tau_pos, double tau_neg, bool needs_grad) {
  const auto shape = check_f32_rows(
      {{log_prob, "log_prob"}, {old_log_prob, "old_log_prob"}, {advantages, "advantages"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor stats = at::empty({B, kPolicyRowStats}, log_prob.options());
  at::Tensor dloss = needs_grad ? at::empty_like(log_prob) : at::Tensor();
  Rows in{log_prob.data_ptr<float>(), old_log_prob.data_ptr<float>(), advantages.data_ptr<float>(),
          mask.data_ptr<float>(), nullptr, T, 0, 0, needs_grad ? dloss.data_ptr<float>() : nullptr,
          stats.data_ptr<float>()};
  if (is_weights.has_value()) {
    const at::Tensor& w = *is_weights;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == B &&
                    (w.size(1) == T || w.size(1) == 1),
                "is_weights: expected a contiguous float32 [B, T] or [B, 1] tensor, got ", w.sizes());
    const bool per_token = w.size(1) == T;
    in.w = w.data_ptr<float>(), in.w_row = per_token ? T : 1, in.w_t = per_token ? 1 : 0;
  }
  const Constants c{1.0f - static_cast<float>(clip_low), 1.0f + static_cast<float>(clip_high),
                    dual_clip.has_value() ? static_cast<float>(*dual_clip) : 1.0f, static_cast<float>(tau_pos),
                    static_cast<float>(tau_neg), dual_clip.has_value()};
  switch (surrogate) {
    case kSurrogateClip: dispatch_level<kSurrogateClip>(ratio_level, in, B, c); break;
    case kSurrogateCispo: dispatch_level<kSurrogateCispo>(ratio_level, in, B, c); break;
    case kSurrogateGpg: dispatch_level<kSurrogateGpg>(ratio_level, in, B, c); break;
    case kSurrogateSapo: dispatch_level<kSurrogateSapo>(ratio_level, in, B, c); break;
    default: TORCH_CHECK(false, "policy_loss_forward: unknown surrogate code ", surrogate);
  }
  return {stats, dloss};
}

}  // namespace ppo_fast
