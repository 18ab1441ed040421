// Device helpers shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ppo_fast {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Calls f(v, x) for v in [0, V) handled by this thread, reading 16 bytes at a time where the
// row is aligned: a scalar head up to the first 16-byte boundary, vectors, a scalar tail.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t V, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
  head = head < V ? head : V;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) f(v, to_float(row[v]));
  const int64_t n_vec = (V - head) / kVec;
  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const uint4 raw = vec[i];
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(head + i * kVec + k, to_float(vals[k]));
  }
  for (int64_t v = head + n_vec * kVec + threadIdx.x; v < V; v += blockDim.x) f(v, to_float(row[v]));
}

}  // namespace cuda
}  // namespace ppo_fast
