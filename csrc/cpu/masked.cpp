// The backward of every masked aggregation on the CPU (ppo_fast/ops/masked.py): each token's
// gradient is the upstream scalar times its row's weight (times x, times the mask).
#include <ATen/Parallel.h>

#include "ops.h"

namespace ppo_fast {

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
