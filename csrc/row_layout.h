// Where row r of logits [..., V] starts, for the C++ and CUDA log-probs kernels: flat [N, V]
// views and [B, T, V] slices such as logits[:, :-1] are read in place, without a copy.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PPO_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PPO_FAST_HOST_DEVICE __attribute__((always_inline)) inline
#endif

namespace ppo_fast {

// Row r starts at (r / rows_per_batch) * stride_batch + (r % rows_per_batch) * stride_row.
struct RowLayout {
  int64_t n_rows, vocab, rows_per_batch, stride_batch, stride_row;

  template <typename T>
  PPO_FAST_HOST_DEVICE const T* row(const T* base, int64_t r) const {
    return base + (r / rows_per_batch) * stride_batch + (r % rows_per_batch) * stride_row;
  }
};

}  // namespace ppo_fast
