// GAE on the CPU: one task per row, the per-step loop of ppo_fast/ops/reference.py in fp32.
// Rewards and values at masked positions are read as 0 (selects, so a NaN there never leaks).
#include "cpu_checks.h"
#include "ops.h"

namespace ppo_fast {

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  const auto shape = check_f32_rows({{rewards, "rewards"}, {values, "values"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const float *r = rewards.data_ptr<float>(), *v = values.data_ptr<float>(), *m = mask.data_ptr<float>();
  float *a = adv.data_ptr<float>(), *R = ret.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float next_v = 0.0f, last = 0.0f;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = b * T + t;
        const bool valid = m[i] != 0.0f;
        const float v_i = valid ? v[i] : 0.0f;
        const float step = (valid ? r[i] : 0.0f) + g * next_v - v_i + gl * last;
        if (valid) next_v = v_i, last = step;
        a[i] = last;
        R[i] = last + v_i;
      }
    }
  });
  return {adv, ret};
}

}  // namespace ppo_fast
