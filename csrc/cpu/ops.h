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

// Returns (logp [N] or empty, entropy [N] or empty, lse [N], stats [N, 3] or empty), all float32.
// The logits z become x = z inv_temperature, or with a softcap c, x = c tanh(scale z / c) inv_temperature.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout, double inv_temperature,
    double scale, std::optional<double> softcap, int64_t ignore_index, bool with_entropy, bool with_stats);

// Returns grad_logits [N, V] in the logits' dtype, written into `out` when given (which may be
// the logits themselves, when they are contiguous [N, V]).
at::Tensor logprobs_backward(const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
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

}  // namespace ppo_fast
