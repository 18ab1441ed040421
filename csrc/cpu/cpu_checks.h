// Helpers of the C++ per-token kernels: the argument check and NaN-propagating max / clamp
// (std::max drops a NaN first argument; the reference's torch.maximum / torch.clamp do not).
#pragma once

#include <torch/extension.h>

namespace ppo_fast {

inline void check_f32_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2, name,
              ": expected a contiguous float32 [B, T] tensor");
}

inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// NaN if x or a bound is NaN (torch.clamp's rule).
inline float nan_clamp(float x, float lo, float hi) {
  return (lo != lo || hi != hi) ? lo + hi : (x < lo ? lo : (x > hi ? hi : x));
}

}  // namespace ppo_fast
