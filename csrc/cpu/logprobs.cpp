// Log-probs and entropy from logits on the CPU: one task per row (at::parallel_for), two
// sweeps over a row that stays in cache (max, then sums of exp). fp32 accumulation; the
// reductions vectorise through `omp simd reduction` (-fopenmp), not -ffast-math. The softcap
// and the row statistics (log sum p^2, mean logit, label is the argmax) are template switches.
#include <cmath>
#include <limits>

#include "fast_math.h"
#include "logprobs_math.h"
#include "ops.h"

namespace ppo_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

template <typename scalar_t, bool Softcap>
inline float x_at(const scalar_t* row, int64_t v, const LogitTransform& tr) {
  const float z = static_cast<float>(row[v]);
  return Softcap ? tr.apply(z) : z * tr.inv_t;
}

// The row's max (and with stats, the max over the columns before y); a NaN or +inf entry then
// makes exp(x - max) NaN, so the row's results are NaN.
template <typename scalar_t, bool Softcap, bool Stats>
float row_max(const scalar_t* __restrict row, int64_t V, const LogitTransform& tr, int64_t y, float* before_out) {
  float m = -kInf, before = -kInf;
#pragma omp simd reduction(max : m, before)
  for (int64_t v = 0; v < V; ++v) {
    const float x = x_at<scalar_t, Softcap>(row, v, tr);
    m = x > m ? x : m;
    if (Stats) before = (v < y && x > before) ? x : before;
  }
  *before_out = before;
  return m;
}

struct ExpSums {
  float d, s, q, x_sum;  // sum e, sum e (x - m), sum e^2, sum x; e = exp(x - m)
};

template <typename scalar_t, bool Softcap, bool Stats>
ExpSums row_exp_sums(const scalar_t* __restrict row, int64_t V, const LogitTransform& tr, float m) {
  float d = 0.0f, s = 0.0f, q = 0.0f, x_sum = 0.0f;
#pragma omp simd reduction(+ : d, s, q, x_sum)
  for (int64_t v = 0; v < V; ++v) {
    const float x = x_at<scalar_t, Softcap>(row, v, tr);
    const float centred = x - m;
    const float e = fast_exp(centred);
    d += e;
    s += e > 0.0f ? e * centred : 0.0f;
    if (Stats) q += e * e, x_sum += x;
  }
  return {d, s, q, x_sum};
}

struct ForwardOut {
  const int64_t* labels;
  float *logp, *entropy, *lse, *stats;  // nullptr where not asked for; stats [N, 3]
};

template <typename scalar_t, bool Softcap, bool Stats>
void forward_rows(const at::Tensor& logits, const RowLayout& layout, const LogitTransform& tr, int64_t ignore_index,
                  const ForwardOut& out) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  at::parallel_for(0, layout.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = layout.row(base, r);
      const int64_t y = out.labels ? out.labels[r] : -1;
      const bool in_range = y >= 0 && y < layout.vocab;
      float before;
      const float m = row_max<scalar_t, Softcap, Stats>(row, layout.vocab, tr, in_range ? y : 0, &before);
      const ExpSums sums = row_exp_sums<scalar_t, Softcap, Stats>(row, layout.vocab, tr, m);
      const float log_d = std::log(sums.d);
      out.lse[r] = m + log_d;
      if (out.entropy) out.entropy[r] = log_d - sums.s / sums.d;  // H = lse - E[x] = log d - E[x - m]
      const float x_y = in_range ? x_at<scalar_t, Softcap>(row, y, tr) : 0.0f;
      if (out.logp) {  // a label outside [0, V) is never read: NaN
        out.logp[r] = y == ignore_index ? 0.0f : in_range ? x_y - out.lse[r] : std::numeric_limits<float>::quiet_NaN();
      }
      if (Stats) {
        float* st = out.stats + r * 3;
        st[0] = std::log(sums.q) - 2.0f * log_d;  // log sum p^2
        st[1] = sums.x_sum / static_cast<float>(layout.vocab);
        st[2] = (in_range && y != ignore_index && x_y >= m && x_y > before) ? 1.0f : 0.0f;
      }
    }
  });
}

template <typename scalar_t, bool Softcap>
void backward_rows(const at::Tensor& logits, const int64_t* labels, const RowLayout& layout, const float* lse,
                   const float* entropy, const float* grad_logp, const float* grad_entropy, const LogitTransform& tr,
                   int64_t ignore_index, scalar_t* grad) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t V = layout.vocab;
  at::parallel_for(0, layout.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = layout.row(base, r);
      scalar_t* out = grad + r * V;
      const int64_t y = labels ? labels[r] : -1;
      const bool has_label = y >= 0 && y < V && y != ignore_index;
      const float g_logp = (grad_logp && has_label) ? grad_logp[r] : 0.0f;
      const float g_entropy = grad_entropy ? grad_entropy[r] : 0.0f;
      const float H = grad_entropy ? entropy[r] : 0.0f;
      const float row_lse = lse[r];
      const LogitTransform t = tr;
      auto grad_at = [=](int64_t v, float indicator) {  // by value: stores to out cannot alias the captures
        const float z = static_cast<float>(row[v]);
        const float logp_v = (Softcap ? t.apply(z) : z * t.inv_t) - row_lse;
        return logprobs_grad(logp_v, fast_exp(logp_v), indicator, g_logp, g_entropy, H, Softcap ? t.slope(z) : t.inv_t);
      };
      // The label's entry is computed before the sweep: `out` may be the logits buffer itself.
      const float label_grad = has_label ? grad_at(y, 1.0f) : 0.0f;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) out[v] = static_cast<scalar_t>(grad_at(v, 0.0f));
      if (has_label) out[y] = static_cast<scalar_t>(label_grad);
    }
  });
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

LogitTransform transform_of(double inv_temperature, double scale, std::optional<double> softcap) {
  return {static_cast<float>(inv_temperature), static_cast<float>(scale),
          softcap.has_value() ? static_cast<float>(*softcap) : 1.0f, softcap.has_value()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout, double inv_temperature,
    double scale, std::optional<double> softcap, int64_t ignore_index, bool with_entropy, bool with_stats) {
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({layout.n_rows}, f32);
  at::Tensor logp = labels.has_value() ? at::empty({layout.n_rows}, f32) : at::Tensor();
  at::Tensor entropy = with_entropy ? at::empty({layout.n_rows}, f32) : at::Tensor();
  at::Tensor stats = with_stats ? at::empty({layout.n_rows, 3}, f32) : at::Tensor();
  const ForwardOut out{labels.has_value() ? labels->data_ptr<int64_t>() : nullptr,
                       logp.defined() ? logp.data_ptr<float>() : nullptr,
                       entropy.defined() ? entropy.data_ptr<float>() : nullptr, lse.data_ptr<float>(),
                       stats.defined() ? stats.data_ptr<float>() : nullptr};
  const LogitTransform tr = transform_of(inv_temperature, scale, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward", [&] {
    if (tr.has_softcap) {
      with_stats ? forward_rows<scalar_t, true, true>(logits, layout, tr, ignore_index, out)
                 : forward_rows<scalar_t, true, false>(logits, layout, tr, ignore_index, out);
    } else {
      with_stats ? forward_rows<scalar_t, false, true>(logits, layout, tr, ignore_index, out)
                 : forward_rows<scalar_t, false, false>(logits, layout, tr, ignore_index, out);
    }
  });
  return {logp, entropy, lse, stats};
}

at::Tensor logprobs_backward(const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double inv_temperature, double scale,
                             std::optional<double> softcap, int64_t ignore_index,
                             const std::optional<at::Tensor>& out) {
  at::Tensor grad = out.has_value() ? *out : at::empty({layout.n_rows, layout.vocab}, logits.options());
  TORCH_CHECK(grad.numel() == layout.n_rows * layout.vocab && grad.scalar_type() == logits.scalar_type() &&
                  grad.is_contiguous(),
              "logprobs_backward: out must be a contiguous [N, V] tensor of the logits' dtype");
  const int64_t* label_ptr = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const LogitTransform tr = transform_of(inv_temperature, scale, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward", [&] {
    auto run = [&](auto softcap_tag) {
      backward_rows<scalar_t, decltype(softcap_tag)::value>(
          logits, label_ptr, layout, lse.data_ptr<float>(), optional_ptr(entropy), optional_ptr(grad_logp),
          optional_ptr(grad_entropy), tr, ignore_index, grad.data_ptr<scalar_t>());
    };
    tr.has_softcap ? run(std::true_type{}) : run(std::false_type{});
  });
  return grad;
}

}  // namespace ppo_fast
