// fast_exp and exp_in_range over a tensor: bound only so that tests/ops/test_cpu_kernels.py can
// measure their error in ulp against float64 on every ISA build.
#include "fast_math.h"
#include "ops.h"

namespace ppo_fast {

at::Tensor exp_values(const at::Tensor& x, bool in_range) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 1,
              "exp_values: expected a contiguous float32 [n] tensor, got ", x.scalar_type(), " ", x.sizes());
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = x.numel();
  if (in_range) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = exp_in_range(in[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = fast_exp(in[i]);
  }
  return out;
}

}  // namespace ppo_fast
