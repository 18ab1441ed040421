// Log-probs and entropy from logits: one block per row, 16-byte loads, warp-shuffle and
// shared-memory reductions of an online-softmax state. Math: ppo_fast/ops/logprobs.py.
#include <cmath>

#include "common.cuh"
#include "launchers.h"
#include "logprobs_math.h"

namespace ppo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 512;

// Online softmax over a set of x: m = max, d = sum exp(x - m), s = sum exp(x - m) (x - m).
struct SoftmaxState {
  float m, d, s;
};

__device__ __forceinline__ void add(SoftmaxState& st, float x) {
  if (x > st.m) {  // re-centre on the new max: sum e (x - m_new) = alpha (s + (m - m_new) d)
    const float alpha = expf(st.m - x);
    st.s = st.d > 0.0f ? alpha * (st.s + (st.m - x) * st.d) : 0.0f;
    st.d *= alpha;
    st.m = x;
  }
  const float e = x > -INFINITY ? expf(x - st.m) : 0.0f;
  st.d += e;
  st.s += e > 0.0f ? e * (x - st.m) : 0.0f;
}

__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const float ea = expf(a.m - m), eb = expf(b.m - m);
  const float sa = a.d > 0.0f ? ea * (a.s + (a.m - m) * a.d) : 0.0f;
  const float sb = b.d > 0.0f ? eb * (b.s + (b.m - m) * b.d) : 0.0f;
  return {m, a.d * ea + b.d * eb, sa + sb};
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxState other{__shfl_xor_sync(0xffffffff, st.m, offset), __shfl_xor_sync(0xffffffff, st.d, offset),
                       __shfl_xor_sync(0xffffffff, st.s, offset)};
    st = merge(st, other);
  }
  return st;
}

// The merged state of the whole block, returned to every thread.
__device__ SoftmaxState block_merge(SoftmaxState st) {
  __shared__ SoftmaxState per_warp[kThreads / 32];
  __shared__ SoftmaxState total;
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = st;
  __syncthreads();
  if (warp == 0) {
    SoftmaxState w = lane < kThreads / 32 ? per_warp[lane] : SoftmaxState{-INFINITY, 0.0f, 0.0f};
    w = warp_merge(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

template <typename T>
__device__ __forceinline__ const T* row_start(const T* logits, const RowLayout& l, int64_t row) {
  return logits + (row / l.rows_per_batch) * l.stride_batch + (row % l.rows_per_batch) * l.stride_row;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, RowLayout layout,
                            float inv_t, int64_t ignore_index, float* logp, float* entropy, float* lse) {
  const int64_t row = blockIdx.x;
  const T* row_ptr = row_start(logits, layout, row);
  SoftmaxState st{-INFINITY, 0.0f, 0.0f};
  for_each_in_row(row_ptr, layout.vocab, [&](int64_t, float x) { add(st, x * inv_t); });
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const float log_d = logf(st.d);
    lse[row] = st.m + log_d;
    if (entropy) entropy[row] = log_d - st.s / st.d;  // H = lse - E[x] = log d - E[x - m]
    if (labels) {
      const int64_t y = labels[row];
      logp[row] = y == ignore_index ? 0.0f : to_float(row_ptr[y]) * inv_t - st.m - log_d;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    logprobs_backward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, RowLayout layout,
                             const float* __restrict__ lse, const float* __restrict__ entropy,
                             const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                             float inv_t, int64_t ignore_index, T* __restrict__ grad) {
  const int64_t row = blockIdx.x, V = layout.vocab;
  const T* row_ptr = row_start(logits, layout, row);
  T* out = grad + row * V;
  const int64_t y = labels ? labels[row] : -1;
  const float g_logp = (grad_logp && y >= 0 && y != ignore_index) ? grad_logp[row] : 0.0f;
  const float g_entropy = grad_entropy ? grad_entropy[row] : 0.0f;
  const float H = grad_entropy ? entropy[row] : 0.0f;
  const float row_lse = lse[row];
  auto grad_at = [&](int64_t v, float x) {
    const float logp_v = x * inv_t - row_lse;
    return logprobs_grad(logp_v, expf(logp_v), v == y ? 1.0f : 0.0f, g_logp, g_entropy, H, inv_t);
  };
  constexpr int kVec = 16 / sizeof(T);
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(row_ptr) ^ reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  if (!same_alignment) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) out[v] = from_float<T>(grad_at(v, to_float(row_ptr[v])));
    return;
  }
  int64_t head = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(row_ptr) & 15)) & 15) / sizeof(T));
  head = head < V ? head : V;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) out[v] = from_float<T>(grad_at(v, to_float(row_ptr[v])));
  const int64_t n_vec = (V - head) / kVec;
  const uint4* in_vec = reinterpret_cast<const uint4*>(row_ptr + head);
  uint4* out_vec = reinterpret_cast<uint4*>(out + head);
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    const uint4 raw = in_vec[i];
    const T* vals = reinterpret_cast<const T*>(&raw);
    uint4 packed;
    T* res = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int k = 0; k < kVec; ++k) res[k] = from_float<T>(grad_at(head + i * kVec + k, to_float(vals[k])));
    out_vec[i] = packed;
  }
  for (int64_t v = head + n_vec * kVec + threadIdx.x; v < V; v += blockDim.x)
    out[v] = from_float<T>(grad_at(v, to_float(row_ptr[v])));
}

template <typename T>
cudaError_t forward_as(const void* logits, const int64_t* labels, RowLayout layout, float inv_t,
                       int64_t ignore_index, float* logp, float* entropy, float* lse, cudaStream_t stream) {
  if (layout.n_rows == 0) return cudaSuccess;
  logprobs_forward_kernel<T><<<static_cast<unsigned>(layout.n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), labels, layout, inv_t, ignore_index, logp, entropy, lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_as(const void* logits, const int64_t* labels, RowLayout layout, const float* lse,
                        const float* entropy, const float* grad_logp, const float* grad_entropy, float inv_t,
                        int64_t ignore_index, void* grad, cudaStream_t stream) {
  if (layout.n_rows == 0) return cudaSuccess;
  logprobs_backward_kernel<T><<<static_cast<unsigned>(layout.n_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), labels, layout, lse, entropy, grad_logp, grad_entropy, inv_t, ignore_index,
      static_cast<T*>(grad));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_logprobs_forward(const void* logits, DType dtype, const int64_t* labels, RowLayout layout,
                                    float inv_temperature, int64_t ignore_index, float* logp, float* entropy,
                                    float* lse, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_as<float>(logits, labels, layout, inv_temperature, ignore_index, logp, entropy, lse, stream);
    case DType::kBFloat16:
      return forward_as<__nv_bfloat16>(logits, labels, layout, inv_temperature, ignore_index, logp, entropy, lse,
                                       stream);
    case DType::kFloat16:
      return forward_as<__half>(logits, labels, layout, inv_temperature, ignore_index, logp, entropy, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_logprobs_backward(const void* logits, DType dtype, const int64_t* labels, RowLayout layout,
                                     const float* lse, const float* entropy, const float* grad_logp,
                                     const float* grad_entropy, float inv_temperature, int64_t ignore_index,
                                     void* grad_logits, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_as<float>(logits, labels, layout, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                                ignore_index, grad_logits, stream);
    case DType::kBFloat16:
      return backward_as<__nv_bfloat16>(logits, labels, layout, lse, entropy, grad_logp, grad_entropy,
                                        inv_temperature, ignore_index, grad_logits, stream);
    case DType::kFloat16:
      return backward_as<__half>(logits, labels, layout, lse, entropy, grad_logp, grad_entropy, inv_temperature,
                                 ignore_index, grad_logits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ppo_fast
