// Helpers of the C++ per-token kernels: the argument check and NaN-propagating max / clamp
// (std::max drops a NaN first argument; the reference's torch.maximum / torch.clamp do not).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <utility>

namespace ppo_fast {

// Each (tensor, name) is a contiguous float32 [B, T] tensor of the first one's shape; returns (B, T).
inline std::pair<int64_t, int64_t> check_f32_rows(
    std::initializer_list<std::pair<const at::Tensor&, const char*>> tensors) {
  const at::Tensor& first = tensors.begin()->first;
  for (const auto& [t, name] : tensors)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.sizes() == first.sizes(),
                name, ": expected a contiguous float32 [B, T] tensor of shape ", first.sizes(), ", got ",
                t.scalar_type(), " ", t.sizes());
  return {first.size(0), first.size(1)};
}

inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// NaN if x or a bound is NaN (torch.clamp's rule).
inline float nan_clamp(float x, float lo, float hi) {
  return (lo != lo || hi != hi) ? lo + hi : (x < lo ? lo : (x > hi ? hi : x));
}

}  // namespace ppo_fast
