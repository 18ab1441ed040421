// GAE on the CPU: the per-step loop of ppo_fast/ops/reference.py in fp32, backwards over T. A
// row is one dependency chain, so a task runs kRowsAtOnce rows side by side (lanes of one
// `omp simd` loop: their steps overlap in the pipeline). Rewards and values at masked positions
// are read as 0 (selects, so a NaN there never leaks); the mask may be bool or float.
#include "cpu_checks.h"
#include "lanes.h"
#include "ops.h"

namespace ppo_fast {
namespace {

constexpr int64_t kRowsAtOnce = 8;

template <typename mask_t>
void gae_rows(const float* r, const float* v, const mask_t* m, int64_t first, int64_t rows, int64_t T, float g,
              float gl, float* a, float* R) {
  float next_v[kRowsAtOnce] = {}, last[kRowsAtOnce] = {};
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma omp simd
    for (int64_t j = 0; j < kRowsAtOnce; ++j) {
      if (j >= rows) continue;
      const int64_t i = (first + j) * T + t;
      const bool valid = mask_value(m[i]) != 0.0f;
      const float v_i = valid ? v[i] : 0.0f;
      const float step = (valid ? r[i] : 0.0f) + g * next_v[j] - v_i + gl * last[j];
      next_v[j] = valid ? v_i : next_v[j];
      last[j] = valid ? step : last[j];
      a[i] = last[j];
      R[i] = last[j] + v_i;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  const auto shape = check_f32_rows({{rewards, "rewards"}, {values, "values"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const float *r = rewards.data_ptr<float>(), *v = values.data_ptr<float>();
  float *a = adv.data_ptr<float>(), *R = ret.data_ptr<float>();
  const int64_t groups = (B + kRowsAtOnce - 1) / kRowsAtOnce;
  const bool bool_mask = mask.scalar_type() == at::kBool;
  at::parallel_for(0, groups, rows_per_task(groups, kRowsAtOnce * T), [&](int64_t begin, int64_t end) {
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t first = grp * kRowsAtOnce, rows = std::min(kRowsAtOnce, B - first);
      if (bool_mask) {
        gae_rows(r, v, static_cast<const uint8_t*>(mask.data_ptr()), first, rows, T, g, gl, a, R);
      } else {
        gae_rows(r, v, mask.data_ptr<float>(), first, rows, T, g, gl, a, R);
      }
    }
  });
  return {adv, ret};
}

}  // namespace ppo_fast
