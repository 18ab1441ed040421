// CPU kernels of ppo_fast (bound as ppo_fast._C): csrc/cpu/<op>.cpp mirrors the Triton kernel of
// ppo_fast/ops/<op>.py, whose module docstring gives the math.
#pragma once

// ATen's tensor and the few ops the kernels call, not <torch/extension.h>: a translation unit
// then compiles in seconds instead of half a minute (only bindings.cpp needs torch's pybind).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <tuple>

#include "row_layout.h"

namespace ppo_fast {

// Returns (logp [N] or empty, entropy [N] or empty, norm [N, 2], stats [N, 3] or empty), all float32;
// norm = (row max m of x, log sum_v exp(x_v - m)): lse = m + log d, kept apart for the backward.
// The logits z become x = z inv_temperature, or with a softcap c, x = c tanh(scale z / c) inv_temperature.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout, double inv_temperature,
    double scale, std::optional<double> softcap, int64_t ignore_index, bool with_entropy, bool with_stats);

// Returns grad_logits [N, V] in the logits' dtype, written into `out` when given (which may be
// the logits themselves, when they are contiguous [N, V]).
at::Tensor logprobs_backward(const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout,
                             const at::Tensor& norm, const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double inv_temperature, double scale,
                             std::optional<double> softcap, int64_t ignore_index,
                             const std::optional<at::Tensor>& out);

// Returns (advantages, returns), float32 [B, T].
std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam);

// Returns (row_stats [B, 5], dloss [B, T] or empty). surrogate / ratio_level: the codes of
// ppo_constants.h; is_weights: none, or float32 [B, T] or [B, 1].
std::tuple<at::Tensor, at::Tensor> policy_loss_forward(const at::Tensor& log_prob, const at::Tensor& old_log_prob,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       const std::optional<at::Tensor>& is_weights,
                                                       int64_t surrogate, int64_t ratio_level, double clip_low,
                                                       double clip_high, std::optional<double> dual_clip,
                                                       double tau_pos, double tau_neg, bool needs_grad);

// Returns (row_stats [B, 3], dloss [B, T] or empty).
std::tuple<at::Tensor, at::Tensor> value_loss_forward(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask,
                                                      double clip, bool needs_grad);

// Per-token KL estimate (float32, shaped like log_prob); estimator: a code of ppo_constants.h;
// straight: the '+' value rule (NaN where k2 is infinite).
at::Tensor kl_forward(const at::Tensor& log_prob, const at::Tensor& ref, int64_t estimator, bool straight);

// Returns (grad log_prob or empty, grad ref or empty): upstream times d KL / d log_prob, and its negative.
std::tuple<at::Tensor, at::Tensor> kl_backward(const at::Tensor& log_prob, const at::Tensor& ref,
                                               const at::Tensor& upstream, int64_t grad_code, bool want_log_prob,
                                               bool want_ref);

// Token rewards [B, T]: -kl_coef KL m, plus scores[b] on row b's last valid token.
at::Tensor compute_rewards_forward(const at::Tensor& scores, const at::Tensor& log_prob, const at::Tensor& ref,
                                   const at::Tensor& mask, double kl_coef, int64_t estimator, bool straight);

// [B, 3] float32 per row: (sum_t m x, sum_t m, sum_t m x^2), in fixed lane blocks.
at::Tensor masked_row_sums_forward(const at::Tensor& x, const at::Tensor& mask);

// (x - mean) rsqrt(var + WHITEN_EPS) (+ mean unless shift_mean) over the masked tokens, float32.
at::Tensor masked_whiten_forward(const at::Tensor& x, const at::Tensor& mask, bool shift_mean);

// fast_exp (in_range false) or exp_in_range (true) of fast_math.h, elementwise: for the accuracy test.
at::Tensor exp_values(const at::Tensor& x, bool in_range);

}  // namespace ppo_fast
