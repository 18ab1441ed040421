// Log-probs and entropy from logits: one block per row, 16-byte loads, per-thread online-softmax
// states in base 2 merged once by warp shuffles and shared memory. Math: ppo_fast/ops/logprobs.py.
// The softcap and the row statistics (log sum p^2, mean logit, label is the argmax) are template
// switches: the plain instantiation is the kernel without them.
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

// Online softmax with base-2 exponentials: m = max x, c = (x - m) log2(e), d = sum 2^c,
// s = sum 2^c c. Then lse = m + ln d (kept as the pair norm = (m, ln d)) and H = ln d - ln 2 * s / d.
// The difference x - m is formed before the scaling, so it is exact for rows of large magnitude
// (-1e8 + small offsets). With stats also q = sum 2^(2c) (log sum p^2 = ln q - 2 ln d), the sum
// of x and the max of x over the columns before the label. m starts finite, so x - m is never
// -inf - -inf.
struct SoftmaxState {
  float m, d, s, q, x_sum, before;
};

template <int N>
struct Values {
  float x[N];
};

__device__ __forceinline__ SoftmaxState empty_state() { return {-kFltMax, 0.0f, 0.0f, 0.0f, 0.0f, -INFINITY}; }

// Re-centres sums kept relative to max m_old on m_new >= m_old: alpha = 2^((m_old - m_new) log2 e).
// Where alpha = 0 the old s vanishes (the old max lies far below, e.g. a finfo.min mask) and is
// dropped: (m_old - m_new) d may overflow there, and 0 * inf is NaN (d alpha stays NaN for a NaN d).
__device__ __forceinline__ float recentred_s(float s, float d, float gap2, float alpha) {
  return alpha > 0.0f ? alpha * (s + gap2 * d) : 0.0f;
}

// Adds N values (columns v0 .. v0 + N - 1; y the label) with one rescale: m' = max(m, max_k x_k),
// the old sums re-centred on m', then one exp2 per value. A NaN value makes d NaN; fmaxf keeps m
// finite or +inf (and +inf makes x - m NaN), so a NaN or +inf logit makes the row's results NaN.
template <bool kStats, int N>
__device__ __forceinline__ void add_values(SoftmaxState& st, const Values<N>& v, int64_t v0, int64_t y) {
  float vmax = v.x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vmax = fmaxf(vmax, v.x[k]);
  const float m = fmaxf(st.m, vmax);
  const float gap2 = (st.m - m) * kLog2e, alpha = exp2f(gap2);
  st.s = recentred_s(st.s, st.d, gap2, alpha);
  st.d *= alpha;  // a NaN d stays NaN
  if constexpr (kStats) st.q *= alpha * alpha;
  st.m = m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float c = (v.x[k] - m) * kLog2e;
    const float e = exp2f(c);
    st.d += e;
    st.s += e > 0.0f ? e * c : 0.0f;  // a -inf logit: e = 0, not 0 * inf
    if constexpr (kStats) {
      st.q += e * e;
      st.x_sum += v.x[k];
      if (v0 + k < y) st.before = fmaxf(st.before, v.x[k]);
    }
  }
}

template <bool kStats>
__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  const float m = fmaxf(a.m, b.m);
  const float gap_a = (a.m - m) * kLog2e, gap_b = (b.m - m) * kLog2e;
  const float ea = exp2f(gap_a), eb = exp2f(gap_b);
  const float sa = recentred_s(a.s, a.d, gap_a, ea), sb = recentred_s(b.s, b.d, gap_b, eb);
  if constexpr (kStats)
    return {m, a.d * ea + b.d * eb, sa + sb, a.q * ea * ea + b.q * eb * eb, a.x_sum + b.x_sum,
            fmaxf(a.before, b.before)};
  return {m, a.d * ea + b.d * eb, sa + sb, 0.0f, 0.0f, -INFINITY};
}

template <bool kStats>
__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxState other{__shfl_xor_sync(0xffffffff, st.m, offset), __shfl_xor_sync(0xffffffff, st.d, offset),
                       __shfl_xor_sync(0xffffffff, st.s, offset), 0.0f, 0.0f, -INFINITY};
    if constexpr (kStats) {
      other.q = __shfl_xor_sync(0xffffffff, st.q, offset);
      other.x_sum = __shfl_xor_sync(0xffffffff, st.x_sum, offset);
      other.before = __shfl_xor_sync(0xffffffff, st.before, offset);
    }
    st = merge<kStats>(st, other);
  }
  return st;
}

// The merged state of the whole block, returned to every thread.
template <bool kStats>
__device__ SoftmaxState block_merge(SoftmaxState st) {
  __shared__ SoftmaxState per_warp[kThreads / 32];
  __shared__ SoftmaxState total;
  st = warp_merge<kStats>(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = st;
  __syncthreads();
  if (warp == 0) {
    SoftmaxState w = lane < kThreads / 32 ? per_warp[lane] : empty_state();
    w = warp_merge<kStats>(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// x of a logit z: z inv_t, or the softcapped transform.
template <bool kSoftcap>
__device__ __forceinline__ float x_of(float z, const LogitTransform& tr) {
  if constexpr (kSoftcap) return tr.apply(z);
  return mul_rn(z, tr.inv_t);
}

// The kVec values of a 16-byte load, as x.
template <typename T, bool kSoftcap>
__device__ __forceinline__ Values<16 / sizeof(T)> scaled(const uint4& raw, const LogitTransform& tr) {
  const T* vals = reinterpret_cast<const T*>(&raw);
  Values<16 / sizeof(T)> out;
#pragma unroll
  for (int k = 0; k < 16 / static_cast<int>(sizeof(T)); ++k) out.x[k] = x_of<kSoftcap>(to_float(vals[k]), tr);
  return out;
}

// A scalar head up to the row's first 16-byte boundary, 16-byte vectors (two loads in flight
// per thread), a scalar tail: each thread keeps its own state, the block merges once.
template <typename T, bool kSoftcap, bool kStats>
__global__ void __launch_bounds__(kThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, RowLayout layout,
                            LogitTransform tr, int64_t ignore_index, float* logp, float* entropy, float* norm,
                            float* stats) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x, V = layout.vocab;
  const T* row_ptr = layout.row(logits, row);
  const int64_t y = labels ? labels[row] : -1;
  SoftmaxState st = empty_state();
  int64_t head = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(row_ptr) & 15)) & 15) / sizeof(T));
  head = head < V ? head : V;
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x)
    add_values<kStats>(st, Values<1>{{x_of<kSoftcap>(to_float(row_ptr[v]), tr)}}, v, y);
  const int64_t n_vec = (V - head) / kVec;
  const uint4* vec = reinterpret_cast<const uint4*>(row_ptr + head);
  int64_t i = threadIdx.x;
  for (; i + blockDim.x < n_vec; i += 2 * blockDim.x) {
    const uint4 a = vec[i], b = vec[i + blockDim.x];
    add_values<kStats>(st, scaled<T, kSoftcap>(a, tr), head + i * kVec, y);
    add_values<kStats>(st, scaled<T, kSoftcap>(b, tr), head + (i + blockDim.x) * kVec, y);
  }
  if (i < n_vec) add_values<kStats>(st, scaled<T, kSoftcap>(vec[i], tr), head + i * kVec, y);
  for (int64_t v = head + n_vec * kVec + threadIdx.x; v < V; v += blockDim.x)
    add_values<kStats>(st, Values<1>{{x_of<kSoftcap>(to_float(row_ptr[v]), tr)}}, v, y);
  st = block_merge<kStats>(st);
  if (threadIdx.x == 0) {
    const float log2_d = log2f(st.d), log_d = log2_d * kLn2;
    norm[2 * row] = st.m;
    norm[2 * row + 1] = log_d;
    if (entropy) entropy[row] = (log2_d - st.s / st.d) * kLn2;
    const bool in_range = y >= 0 && y < V;
    const float z_y = in_range ? to_float(row_ptr[y]) : 0.0f;  // a label outside [0, V) is never read
    const float x_y = x_of<kSoftcap>(z_y, tr);  // as add_values computed it, to compare exactly
    if (labels) logp[row] = y == ignore_index ? 0.0f : in_range ? (x_y - st.m) - log_d : __int_as_float(0x7fc00000);
    if constexpr (kStats) {
      stats[row * 3] = (log2f(st.q) - 2.0f * log2_d) * kLn2;
      stats[row * 3 + 1] = st.x_sum / static_cast<float>(V);
      stats[row * 3 + 2] = (in_range && y != ignore_index && x_y >= st.m && x_y > st.before) ? 1.0f : 0.0f;
    }
  }
}

template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kThreads)
    logprobs_backward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, RowLayout layout,
                             const float* __restrict__ norm, const float* __restrict__ entropy,
                             const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                             LogitTransform tr, int64_t ignore_index, T* __restrict__ grad) {
  const int64_t row = blockIdx.x, V = layout.vocab;
  const T* row_ptr = layout.row(logits, row);
  T* out = grad + row * V;
  const int64_t y = labels ? labels[row] : -1;
  // a label outside [0, V) is another rank's column (a vocabulary shard): -p g_logp still applies
  const float g_logp = (grad_logp && y != ignore_index) ? grad_logp[row] : 0.0f;
  const float g_entropy = grad_entropy ? grad_entropy[row] : 0.0f;
  const float H = grad_entropy ? entropy[row] : 0.0f;
  const float row_max = norm[2 * row], log_d = norm[2 * row + 1];
  auto grad_at = [&](int64_t v, float z) {  // log p = (x - m) - log d, p = 2^(log p log2(e))
    const float logp = (x_of<kSoftcap>(z, tr) - row_max) - log_d;
    return logprobs_grad(logp, exp2f(logp * kLog2e), v == y ? 1.0f : 0.0f, g_logp, g_entropy, H,
                         kSoftcap ? tr.slope(z) : tr.inv_t);
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
cudaError_t forward_as(const void* logits, const int64_t* labels, RowLayout layout, LogitTransform tr,
                       int64_t ignore_index, float* logp, float* entropy, float* norm, float* stats,
                       cudaStream_t stream) {
  if (layout.n_rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(layout.n_rows));
  const T* z = static_cast<const T*>(logits);
  if (tr.has_softcap && stats)
    logprobs_forward_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(z, labels, layout, tr, ignore_index, logp,
                                                                          entropy, norm, stats);
  else if (tr.has_softcap)
    logprobs_forward_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(z, labels, layout, tr, ignore_index, logp,
                                                                           entropy, norm, stats);
  else if (stats)
    logprobs_forward_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(z, labels, layout, tr, ignore_index, logp,
                                                                           entropy, norm, stats);
  else
    logprobs_forward_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(z, labels, layout, tr, ignore_index,
                                                                            logp, entropy, norm, stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_as(const void* logits, const int64_t* labels, RowLayout layout, const float* norm,
                        const float* entropy, const float* grad_logp, const float* grad_entropy, LogitTransform tr,
                        int64_t ignore_index, void* grad, cudaStream_t stream) {
  if (layout.n_rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(layout.n_rows));
  if (tr.has_softcap)
    logprobs_backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(logits), labels, layout,
                                                                     norm, entropy, grad_logp, grad_entropy, tr,
                                                                     ignore_index, static_cast<T*>(grad));
  else
    logprobs_backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(logits), labels, layout,
                                                                      norm, entropy, grad_logp, grad_entropy, tr,
                                                                      ignore_index, static_cast<T*>(grad));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_logprobs_forward(const void* logits, DType dtype, const int64_t* labels, RowLayout layout,
                                    LogitTransform tr, int64_t ignore_index, float* logp, float* entropy, float* norm,
                                    float* stats, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_as<float>(logits, labels, layout, tr, ignore_index, logp, entropy, norm, stats, stream);
    case DType::kBFloat16:
      return forward_as<__nv_bfloat16>(logits, labels, layout, tr, ignore_index, logp, entropy, norm, stats, stream);
    case DType::kFloat16:
      return forward_as<__half>(logits, labels, layout, tr, ignore_index, logp, entropy, norm, stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_logprobs_backward(const void* logits, DType dtype, const int64_t* labels, RowLayout layout,
                                     const float* norm, const float* entropy, const float* grad_logp,
                                     const float* grad_entropy, LogitTransform tr, int64_t ignore_index,
                                     void* grad_logits, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_as<float>(logits, labels, layout, norm, entropy, grad_logp, grad_entropy, tr, ignore_index,
                                grad_logits, stream);
    case DType::kBFloat16:
      return backward_as<__nv_bfloat16>(logits, labels, layout, norm, entropy, grad_logp, grad_entropy, tr,
                                        ignore_index, grad_logits, stream);
    case DType::kFloat16:
      return backward_as<__half>(logits, labels, layout, norm, entropy, grad_logp, grad_entropy, tr, ignore_index,
                                 grad_logits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ppo_fast
