// Log-probs and entropy from logits on the CPU: one task per row (at::parallel_for), two
// sweeps over a row that stays in cache (max, then sums of exp). fp32 accumulation; the
// reductions vectorise through `omp simd reduction` (-fopenmp), not -ffast-math.
#include <cmath>
#include <limits>

#include "fast_math.h"
#include "logprobs_math.h"
#include "ops.h"

namespace ppo_fast {
namespace {

// The row's max; a NaN or +inf entry then makes exp(x - max) NaN, so the row's results are NaN.
template <typename scalar_t>
float row_max(const scalar_t* __restrict row, int64_t V, float inv_t) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    const float x = static_cast<float>(row[v]) * inv_t;
    m = x > m ? x : m;
  }
  return m;
}

// d = sum exp(x - m); s = sum exp(x - m) (x - m).
template <typename scalar_t>
void row_exp_sums(const scalar_t* __restrict row, int64_t V, float inv_t, float m, float* d_out, float* s_out) {
  float d = 0.0f, s = 0.0f;
#pragma omp simd reduction(+ : d, s)
  for (int64_t v = 0; v < V; ++v) {
    const float centred = static_cast<float>(row[v]) * inv_t - m;
    const float e = fast_exp(centred);
    d += e;
    s += e > 0.0f ? e * centred : 0.0f;
  }
  *d_out = d;
  *s_out = s;
}

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const int64_t* labels, const RowLayout& layout, float inv_t,
                  int64_t ignore_index, float* logp, float* entropy, float* lse) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  at::parallel_for(0, layout.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = layout.row(base, r);
      const float m = row_max(row, layout.vocab, inv_t);
      float d, s;
      row_exp_sums(row, layout.vocab, inv_t, m, &d, &s);
      const float log_d = std::log(d);
      lse[r] = m + log_d;
      if (entropy) entropy[r] = log_d - s / d;  // H = lse - E[x] = log d - E[x - m]
      if (labels) {  // a label outside [0, V) is never read: NaN
        const int64_t y = labels[r];
        const bool in_range = y >= 0 && y < layout.vocab;
        logp[r] = y == ignore_index ? 0.0f
                  : in_range        ? static_cast<float>(row[y]) * inv_t - lse[r]
                                    : std::numeric_limits<float>::quiet_NaN();
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const int64_t* labels, const RowLayout& layout, const float* lse,
                   const float* entropy, const float* grad_logp, const float* grad_entropy, float inv_t,
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
      auto grad_at = [=](int64_t v, float indicator) {  // by value: stores to out cannot alias the captures
        const float logp_v = static_cast<float>(row[v]) * inv_t - row_lse;
        return logprobs_grad(logp_v, fast_exp(logp_v), indicator, g_logp, g_entropy, H, inv_t);
      };
      // The label's entry is computed before the sweep: `out` may be the logits buffer itself.
      const float label_grad = has_label ? grad_at(y, 1.0f) : 0.0f;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) out[v] = static_cast<scalar_t>(grad_at(v, 0.0f));
      if (has_label) out[y] = static_cast<scalar_t>(label_grad);
    }
  });
}

const float* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const c10::optional<at::Tensor>& labels, RowLayout layout, double inv_temperature,
    int64_t ignore_index, bool with_entropy) {
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({layout.n_rows}, f32);
  at::Tensor logp = labels.has_value() ? at::empty({layout.n_rows}, f32) : at::Tensor();
  at::Tensor entropy = with_entropy ? at::empty({layout.n_rows}, f32) : at::Tensor();
  const int64_t* label_ptr = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward", [&] {
    forward_rows<scalar_t>(logits, label_ptr, layout, static_cast<float>(inv_temperature), ignore_index,
                           logp.defined() ? logp.data_ptr<float>() : nullptr,
                           entropy.defined() ? entropy.data_ptr<float>() : nullptr, lse.data_ptr<float>());
  });
  return {logp, entropy, lse};
}

at::Tensor logprobs_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& labels, RowLayout layout,
                             const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                             const c10::optional<at::Tensor>& grad_logp,
                             const c10::optional<at::Tensor>& grad_entropy, double inv_temperature,
                             int64_t ignore_index, const c10::optional<at::Tensor>& out) {
  at::Tensor grad = out.has_value() ? *out : at::empty({layout.n_rows, layout.vocab}, logits.options());
  TORCH_CHECK(grad.numel() == layout.n_rows * layout.vocab && grad.scalar_type() == logits.scalar_type() &&
                  grad.is_contiguous(),
              "logprobs_backward: out must be a contiguous [N, V] tensor of the logits' dtype");
  const int64_t* label_ptr = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward", [&] {
    backward_rows<scalar_t>(logits, label_ptr, layout, lse.data_ptr<float>(), optional_ptr(entropy),
                            optional_ptr(grad_logp), optional_ptr(grad_entropy), static_cast<float>(inv_temperature),
                            ignore_index, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace ppo_fast
