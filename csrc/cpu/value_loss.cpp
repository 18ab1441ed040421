// The clipped value loss on the CPU (math: ppo_fast/ops/value_loss.py); the layout and rules
// of policy_loss.cpp. v_c = clamp(v, old - clip, old + clip) is v itself inside the range.
#include <limits>

#include "cpu_checks.h"
#include "ops.h"
#include "ppo_constants.h"

namespace ppo_fast {

std::tuple<at::Tensor, at::Tensor> value_loss_forward(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask,
                                                      double clip, bool needs_grad) {
  const auto shape =
      check_f32_rows({{values, "values"}, {old_values, "old_values"}, {returns, "returns"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor stats = at::empty({B, kValueRowStats}, values.options());
  at::Tensor dloss = needs_grad ? at::empty_like(values) : at::Tensor();
  const float cl = static_cast<float>(clip);
  const float *v_in = values.data_ptr<float>(), *old_in = old_values.data_ptr<float>();
  const float *R_in = returns.data_ptr<float>(), *m = mask.data_ptr<float>();
  float* d_out = needs_grad ? dloss.data_ptr<float>() : nullptr;
  float* s_out = stats.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double loss_sum = 0, count = 0, clipped = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        const bool valid = m[i] != 0.0f;
        const float v = valid ? v_in[i] : 0.0f, old = valid ? old_in[i] : 0.0f, R = valid ? R_in[i] : 0.0f;
        const float lo = old - cl, hi = old + cl;
        const float vc = nan_clamp(v, lo, hi);
        const float l1 = (v - R) * (v - R), l2 = (vc - R) * (vc - R);
        if (d_out) {
          const bool inside = v >= lo && v <= hi;
          const float d = l1 >= l2 ? 2.0f * (v - R) : (inside ? 2.0f * (vc - R) : 0.0f);
          d_out[i] = m[i] * (l1 != l1 ? l1 : d);  // a NaN loss has a NaN gradient, as autograd gives
        }
        loss_sum += m[i] * nan_max(l1, l2);
        count += m[i];
        clipped += m[i] * (l2 > l1);
      }
      float* s = s_out + b * kValueRowStats;
      s[kRowLoss] = loss_sum, s[kRowTokens] = count, s[kRowClipped] = clipped;
    }
  });
  return {stats, dloss};
}

}  // namespace ppo_fast
