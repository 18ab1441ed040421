// The PPO clipped policy loss on the CPU (math: ppo_fast/ops/policy_loss.py). Inputs arrive as
// contiguous float32 [B, T]; one task per row, row sums accumulated in double. Inputs at masked
// positions are read as 0 and max/clamp propagate NaN, as the reference does.
#include "cpu_checks.h"
#include "ops.h"
#include "ppo_constants.h"

namespace ppo_fast {

std::tuple<at::Tensor, at::Tensor> policy_loss_forward(const at::Tensor& log_prob, const at::Tensor& old_log_prob,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       double clip_low, double clip_high,
                                                       c10::optional<double> dual_clip, bool needs_grad) {
  const auto shape = check_f32_rows(
      {{log_prob, "log_prob"}, {old_log_prob, "old_log_prob"}, {advantages, "advantages"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor stats = at::empty({B, kPolicyRowStats}, log_prob.options());
  at::Tensor dloss = needs_grad ? at::empty_like(log_prob) : at::Tensor();
  const float lo = 1.0f - static_cast<float>(clip_low), hi = 1.0f + static_cast<float>(clip_high);
  const bool has_dual = dual_clip.has_value();
  const float c = has_dual ? static_cast<float>(*dual_clip) : 1.0f;
  const float *lp = log_prob.data_ptr<float>(), *old = old_log_prob.data_ptr<float>();
  const float *A = advantages.data_ptr<float>(), *m = mask.data_ptr<float>();
  float* d_out = needs_grad ? dloss.data_ptr<float>() : nullptr;
  float* s_out = stats.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double loss_sum = 0, count = 0, clipped = 0, neg_delta = 0, lower_sum = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        const bool valid = m[i] != 0.0f;
        const float adv = valid ? A[i] : 0.0f;
        const float raw = valid ? lp[i] - old[i] : 0.0f;
        const float delta = nan_clamp(raw, -kLogRatioClamp, kLogRatioClamp);
        const float ratio = std::exp(delta);
        const float l1 = -adv * ratio, l2 = -adv * nan_clamp(ratio, lo, hi);
        float loss = nan_max(l1, l2);
        float dratio = l1 >= l2 ? -adv : 0.0f;
        bool lower = false;
        if (has_dual) {
          lower = adv < 0 && loss > -adv * c;
          if (lower) loss = -adv * c, dratio = 0.0f;
        }
        if (d_out) d_out[i] = (raw >= -kLogRatioClamp && raw <= kLogRatioClamp) ? m[i] * dratio * ratio : 0.0f;
        loss_sum += m[i] * loss;
        count += m[i];
        clipped += m[i] * (l2 > l1);
        neg_delta -= m[i] * delta;
        lower_sum += m[i] * lower;
      }
      float* s = s_out + b * kPolicyRowStats;
      s[kRowLoss] = loss_sum, s[kRowTokens] = count, s[kRowClipped] = clipped;
      s[kRowNegLogRatio] = neg_delta, s[kRowLowerClipped] = lower_sum;
    }
  });
  return {stats, dloss};
}

}  // namespace ppo_fast
