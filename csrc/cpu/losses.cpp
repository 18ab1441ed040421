// Policy loss, value loss and GAE on the CPU. Inputs arrive as contiguous float32 [B, T]
// (the Python wrapper converts); one task per row; the loss rows are branch-free
// `omp simd` loops with fp32 reductions.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "fast_math.h"
#include "ops.h"

namespace ppo_fast {
namespace {

inline float clampf(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2, name,
              ": expected a contiguous float32 [B, T] tensor");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  check_f32(rewards, "rewards");
  check_f32(values, "values");
  check_f32(mask, "mask");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const float *r = rewards.data_ptr<float>(), *v = values.data_ptr<float>(), *m = mask.data_ptr<float>();
  float *a = adv.data_ptr<float>(), *R = ret.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float next_v = 0.0f, last = 0.0f;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = b * T + t;
        const float step = r[i] + g * next_v - v[i] + gl * last;
        next_v = m[i] * v[i] + (1.0f - m[i]) * next_v;
        last = m[i] * step + (1.0f - m[i]) * last;
        a[i] = last;
        R[i] = last + v[i];
      }
    }
  });
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> policy_loss_forward(const at::Tensor& log_prob, const at::Tensor& old_log_prob,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       double clip_low, double clip_high,
                                                       c10::optional<double> dual_clip, bool needs_grad) {
  for (auto [t, n] : {std::pair{&log_prob, "log_prob"}, {&old_log_prob, "old_log_prob"}, {&advantages, "advantages"},
                      {&mask, "mask"}})
    check_f32(*t, n);
  const int64_t B = log_prob.size(0), T = log_prob.size(1);
  at::Tensor stats = at::empty({B, 5}, log_prob.options());
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
      const float *lp_r = lp + b * T, *old_r = old + b * T, *A_r = A + b * T, *m_r = m + b * T;
      float* d_r = d_out ? d_out + b * T : nullptr;
      float loss_sum = 0, count = 0, clipped = 0, neg_delta = 0, lower_sum = 0;
#pragma omp simd reduction(+ : loss_sum, count, clipped, neg_delta, lower_sum)
      for (int64_t t = 0; t < T; ++t) {
        const float raw = lp_r[t] - old_r[t], delta = clampf(raw, -20.0f, 20.0f);
        const float ratio = fast_exp(delta), adv = A_r[t];
        const float l1 = -adv * ratio, l2 = -adv * clampf(ratio, lo, hi);
        const float loss_max = l1 > l2 ? l1 : l2;
        const float dual = -adv * c;
        const bool lower = has_dual && adv < 0.0f && loss_max > dual;
        const float loss = lower ? dual : loss_max;
        const float dratio = (l1 >= l2 && !lower) ? -adv : 0.0f;
        if (d_r) d_r[t] = (raw >= -20.0f && raw <= 20.0f) ? m_r[t] * dratio * ratio : 0.0f;
        loss_sum += m_r[t] * loss;
        count += m_r[t];
        clipped += l2 > l1 ? m_r[t] : 0.0f;
        neg_delta -= m_r[t] * delta;
        lower_sum += lower ? m_r[t] : 0.0f;
      }
      float* s = s_out + b * 5;
      s[0] = loss_sum, s[1] = count, s[2] = clipped, s[3] = neg_delta, s[4] = lower_sum;
    }
  });
  return {stats, dloss};
}

std::tuple<at::Tensor, at::Tensor> value_loss_forward(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask,
                                                      double clip, bool needs_grad) {
  for (auto [t, n] : {std::pair{&values, "values"}, {&old_values, "old_values"}, {&returns, "returns"},
                      {&mask, "mask"}})
    check_f32(*t, n);
  const int64_t B = values.size(0), T = values.size(1);
  at::Tensor stats = at::empty({B, 3}, values.options());
  at::Tensor dloss = needs_grad ? at::empty_like(values) : at::Tensor();
  const float cl = static_cast<float>(clip);
  const float *v = values.data_ptr<float>(), *old = old_values.data_ptr<float>();
  const float *R = returns.data_ptr<float>(), *m = mask.data_ptr<float>();
  float* d_out = needs_grad ? dloss.data_ptr<float>() : nullptr;
  float* s_out = stats.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float *v_r = v + b * T, *old_r = old + b * T, *R_r = R + b * T, *m_r = m + b * T;
      float* d_r = d_out ? d_out + b * T : nullptr;
      float loss_sum = 0, count = 0, clipped = 0;
#pragma omp simd reduction(+ : loss_sum, count, clipped)
      for (int64_t t = 0; t < T; ++t) {
        const float step = v_r[t] - old_r[t];
        const float vc = old_r[t] + clampf(step, -cl, cl);
        const float l1 = (v_r[t] - R_r[t]) * (v_r[t] - R_r[t]), l2 = (vc - R_r[t]) * (vc - R_r[t]);
        if (d_r) {
          const bool inside = step >= -cl && step <= cl;
          d_r[t] = m_r[t] * (l1 >= l2 ? 2.0f * (v_r[t] - R_r[t]) : (inside ? 2.0f * (vc - R_r[t]) : 0.0f));
        }
        loss_sum += m_r[t] * (l1 > l2 ? l1 : l2);
        count += m_r[t];
        clipped += l2 > l1 ? m_r[t] : 0.0f;
      }
      float* s = s_out + b * 3;
      s[0] = loss_sum, s[1] = count, s[2] = clipped;
    }
  });
  return {stats, dloss};
}

at::Tensor scale_rows(const at::Tensor& row_weight, const at::Tensor& upstream, int64_t B, int64_t T,
                      const c10::optional<at::Tensor>& x, const c10::optional<at::Tensor>& mask) {
  at::Tensor out = at::empty({B, T}, row_weight.options().dtype(at::kFloat));
  const float g = upstream.item<float>();
  const float* w = row_weight.data_ptr<float>();
  const float* xp = x.has_value() ? x->data_ptr<float>() : nullptr;
  const float* mp = mask.has_value() ? mask->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        o[i] = g * w[b] * (xp ? xp[i] : 1.0f) * (mp ? mp[i] : 1.0f);
      }
  });
  return out;
}

}  // namespace ppo_fast
