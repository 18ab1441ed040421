// Helpers of the C++ per-token kernels: the argument check, task sizes and a NaN-propagating
// clamp (nan_max and clamp_to are in policy_math.h, which CUDA code can include too).
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <string_view>
#include <utility>

#include "policy_math.h"

namespace ppo_fast {

// Each (tensor, name) is a contiguous float32 [B, T] tensor of the first one's shape (one named
// "mask" may be bool); returns (B, T).
inline std::pair<int64_t, int64_t> check_f32_rows(
    std::initializer_list<std::pair<const at::Tensor&, const char*>> tensors) {
  const at::Tensor& first = tensors.begin()->first;
  for (const auto& [t, name] : tensors) {
    const bool dtype_ok = t.scalar_type() == at::kFloat ||
                          (t.scalar_type() == at::kBool && std::string_view(name) == "mask");
    TORCH_CHECK(dtype_ok && t.is_contiguous() && t.dim() == 2 && t.sizes() == first.sizes(), name,
                ": expected a contiguous float32 [B, T] tensor (a mask may be bool) of shape ", first.sizes(),
                ", got ", t.scalar_type(), " ", t.sizes());
  }
  return {first.size(0), first.size(1)};
}

// Rows per at::parallel_for task: enough tokens per task (about 16k) that a short batch runs on
// one thread instead of waking them all for microseconds of work.
inline int64_t rows_per_task(int64_t rows, int64_t tokens_per_row) {
  constexpr int64_t kTokensPerTask = 16384;
  const int64_t per_task = kTokensPerTask / (tokens_per_row > 0 ? tokens_per_row : 1);
  return per_task > 1 ? per_task : 1;
}

// Elements per at::parallel_for task of the elementwise kernels (KL, whitening).
constexpr int64_t kElementsPerTask = 32768;

// NaN if x or a bound is NaN (torch.clamp's rule).
__attribute__((always_inline)) inline float nan_clamp(float x, float lo, float hi) {
  const float clamped = clamp_to(x, lo, hi), bad = lo + hi;
  return lo != lo ? bad : (hi != hi ? bad : clamped);
}

}  // namespace ppo_fast
