// Policy loss, value loss and GAE on the CPU. Inputs arrive as contiguous float32 [B, T]
// (the Python wrapper converts); one task per row, row sums accumulated in double.
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
      double loss_sum = 0, count = 0, clipped = 0, neg_delta = 0, lower_sum = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        const float raw = lp[i] - old[i], delta = clampf(raw, -20.0f, 20.0f);
        const float ratio = std::exp(delta);
        const float l1 = -A[i] * ratio, l2 = -A[i] * clampf(ratio, lo, hi);
        float loss = std::max(l1, l2);
        float dratio = l1 >= l2 ? -A[i] : 0.0f;
        bool lower = false;
        if (has_dual) {
          lower = A[i] < 0 && loss > -A[i] * c;
          if (lower) loss = -A[i] * c, dratio = 0.0f;
        }
        if (d_out) d_out[i] = (raw >= -20.0f && raw <= 20.0f) ? m[i] * dratio * ratio : 0.0f;
        loss_sum += m[i] * loss;
        count += m[i];
        clipped += m[i] * (l2 > l1);
        neg_delta -= m[i] * delta;
        lower_sum += m[i] * lower;
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
      double loss_sum = 0, count = 0, clipped = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        const float step = v[i] - old[i];
        const float vc = old[i] + clampf(step, -cl, cl);
        const float l1 = (v[i] - R[i]) * (v[i] - R[i]), l2 = (vc - R[i]) * (vc - R[i]);
        if (d_out) {
          const bool inside = step >= -cl && step <= cl;
          d_out[i] = m[i] * (l1 >= l2 ? 2.0f * (v[i] - R[i]) : (inside ? 2.0f * (vc - R[i]) : 0.0f));
        }
        loss_sum += m[i] * std::max(l1, l2);
        count += m[i];
        clipped += m[i] * (l2 > l1);
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
