// Log-probs and entropy from logits: one block per row, 16-byte loads, per-thread online-softmax
// states in base 2 merged once by warp shuffles and shared memory. Math: ppo_fast/ops/logprobs.py.
#include <cmath>

#include "common.cuh"
#include "launchers.h"
#include "logprobs_math.h"

namespace ppo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kFltMax = 3.402823466e38f;

// Online softmax in base 2 over x2 = x * log2(e) / T: m = max x2, d = sum 2^(x2 - m),
// s = sum 2^(x2 - m) (x2 - m). Then lse = (m + log2 d) ln 2 and H = ln d - ln 2 * s / d.
// m starts finite, so x2 - m is never -inf - -inf.
struct SoftmaxState {
  float m, d, s;
};

template <int N>
struct Values {
  float x[N];
};

// Adds N values with one rescale (no branch): m' = max(m, max_k x_k), the old sums re-centred
// on m' by alpha = 2^(m - m'), then one exp2 per value. A NaN value makes d NaN; fmaxf keeps m
// finite or +inf (and +inf makes x - m NaN), so a NaN or +inf logit makes the row's results NaN.
template <int N>
__device__ __forceinline__ void add_values(SoftmaxState& st, const Values<N>& v) {
  float vmax = v.x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vmax = fmaxf(vmax, v.x[k]);
  const float m = fmaxf(st.m, vmax);
  const float alpha = exp2f(st.m - m);
  st.s = alpha * (st.s + (st.d > 0.0f ? (st.m - m) * st.d : 0.0f));
  st.d *= alpha;
  st.m = m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float c = v.x[k] - m;
    const float e = exp2f(c);
    st.d += e;
    st.s += e > 0.0f ? e * c : 0.0f;  // a -inf logit: e = 0, not 0 * inf
  }
}

__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.m, b.m);
  const float ea = exp2f(a.m - m), eb = exp2f(b.m - m);
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
    SoftmaxState w = lane < kThreads / 32 ? per_warp[lane] : SoftmaxState{-kFltMax, 0.0f, 0.0f};
    w = warp_merge(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// The kVec values of a 16-byte load, as floats times `scale`.
template <typename T>
__device__ __forceinline__ Values<16 / sizeof(T)> scaled(const uint4& raw, float scale) {
  const T* vals = reinterpret_cast<const T*>(&raw);
  Values<16 / sizeof(T)> out;
#pragma unroll
  for (int k = 0; k < 16 / static_cast<int>(sizeof(T)); ++k) out.x[k] = to_float(vals[k]) * scale;
  return out;
}

// A scalar head up to the row's first 16-byte boundary, 16-byte vectors (two loads in flight
// per thread), a scalar tail: each thread keeps its own state, the block merges once.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, RowLayout layout,
                            float inv_t, int64_t ignore_index, float* logp, float* entropy, float* lse) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x, V = layout.vocab;
  const T* row_ptr = layout.row(logits, row);
  const float scale = inv_t * kLog2e;
  SoftmaxState st{-kFltMax, 0.0f, 0.0f};
  int64_t head = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(row_ptr) & 15)) & 15) / sizeof(T));
  head = head < V ? head : V;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) add_values(st, Values<1>{{to_float(row_ptr[v]) * scale}});
  const int64_t n_vec = (V - head) / kVec;
  const uint4* vec = reinterpret_cast<const uint4*>(row_ptr + head);
  int64_t i = threadIdx.x;
  for (; i + blockDim.x < n_vec; i += 2 * blockDim.x) {
    const uint4 a = vec[i], b = vec[i + blockDim.x];
    add_values(st, scaled<T>(a, scale));
    add_values(st, scaled<T>(b, scale));
  }
  if (i < n_vec) add_values(st, scaled<T>(vec[i], scale));
  for (int64_t v = head + n_vec * kVec + threadIdx.x; v < V; v += blockDim.x)
    add_values(st, Values<1>{{to_float(row_ptr[v]) * scale}});
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const float log2_d = log2f(st.d);
    const float row_lse = (st.m + log2_d) * kLn2;
    lse[row] = row_lse;
    if (entropy) entropy[row] = (log2_d - st.s / st.d) * kLn2;
    if (labels) {  // a label outside [0, V) is never read: NaN
      const int64_t y = labels[row];
      logp[row] = y == ignore_index      ? 0.0f
                  : (y >= 0 && y < V) ? to_float(row_ptr[y]) * inv_t - row_lse
                                      : __int_as_float(0x7fc00000);
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
  const T* row_ptr = layout.row(logits, row);
  T* out = grad + row * V;
  const int64_t y = labels ? labels[row] : -1;
  const float g_logp = (grad_logp && y >= 0 && y < V && y != ignore_index) ? grad_logp[row] : 0.0f;
  const float g_entropy = grad_entropy ? grad_entropy[row] : 0.0f;
  const float H = grad_entropy ? entropy[row] : 0.0f;
  const float scale = inv_t * kLog2e, lse2 = lse[row] * kLog2e;
  auto grad_at = [&](int64_t v, float x) {  // p = 2^(x log2(e) / T - lse log2(e))
    const float logp2 = fmaf(x, scale, -lse2);
    return logprobs_grad(logp2 * kLn2, exp2f(logp2), v == y ? 1.0f : 0.0f, g_logp, g_entropy, H, inv_t);
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
