// GAE with one block per row. Both recurrences (next value, advantage) are affine maps
// s -> a s + b applied backwards over t (ppo_fast/ops/gae.py). Rewards and values at masked
// positions are read as 0 (selects, so that a NaN there never reaches a valid position). Each thread composes
// the maps of its contiguous segment of T, a block scan over the segments gives each thread
// its incoming state, and the thread replays its segment from it: O(T / threads + log threads)
// steps per row, fp32, exact for long T.
#include "common.cuh"
#include "launchers.h"

namespace ppo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct Affine {
  float a, b;
};

// Apply `first`, then `second`.
__device__ __forceinline__ Affine then(Affine first, Affine second) {
  return {first.a * second.a, second.a * first.b + second.b};
}

// Thread j owns a segment; segments are processed from the last (j = kThreads - 1) backwards.
// Returns the state entering thread j's segment: the maps of all later segments applied to 0.
__device__ float incoming_state(Affine own, float* sa, float* sb) {
  const int q = kThreads - 1 - threadIdx.x;  // rank in processing order
  sa[q] = own.a;
  sb[q] = own.b;
  __syncthreads();
  for (int offset = 1; offset < kThreads; offset <<= 1) {  // Hillis-Steele inclusive scan
    Affine acc{sa[q], sb[q]};
    if (q >= offset) acc = then(Affine{sa[q - offset], sb[q - offset]}, acc);
    __syncthreads();
    sa[q] = acc.a;
    sb[q] = acc.b;
    __syncthreads();
  }
  const float state = q == 0 ? 0.0f : sb[q - 1];
  __syncthreads();
  return state;
}

__global__ void __launch_bounds__(kThreads)
    gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values, const float* __restrict__ mask,
               int64_t T, float gamma, float gamma_lam, float* __restrict__ advantages, float* __restrict__ returns) {
  __shared__ float sa[kThreads], sb[kThreads];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T;
  const float *r_in = rewards + base, *v_in = values + base, *m = mask + base;
  auto r = [&](int64_t t) { return m[t] != 0.0f ? r_in[t] : 0.0f; };
  auto v = [&](int64_t t) { return m[t] != 0.0f ? v_in[t] : 0.0f; };
  const int64_t per_thread = (T + kThreads - 1) / kThreads;
  const int64_t lo = min(T, threadIdx.x * per_thread), hi = min(T, lo + per_thread);

  // next_v_t = (1 - m_{t+1}) next_v_{t+1} + m_{t+1} v_{t+1}
  Affine next_v_map{1.0f, 0.0f};
  for (int64_t t = hi - 1; t >= lo; --t)
    if (t + 1 < T) next_v_map = then(next_v_map, Affine{1.0f - m[t + 1], m[t + 1] * v(t + 1)});
  const float next_v_in = incoming_state(next_v_map, sa, sb);

  // A_t = (1 - m_t + m_t gamma lam) A_{t+1} + m_t delta_t,  delta_t = r_t + gamma next_v_t - v_t
  Affine adv_map{1.0f, 0.0f};
  float next_v = next_v_in;
  for (int64_t t = hi - 1; t >= lo; --t) {
    if (t + 1 < T) next_v = (1.0f - m[t + 1]) * next_v + m[t + 1] * v(t + 1);
    const float delta = r(t) + gamma * next_v - v(t);
    adv_map = then(adv_map, Affine{1.0f - m[t] + m[t] * gamma_lam, m[t] * delta});
  }
  float adv = incoming_state(adv_map, sa, sb);

  next_v = next_v_in;
  for (int64_t t = hi - 1; t >= lo; --t) {
    if (t + 1 < T) next_v = (1.0f - m[t + 1]) * next_v + m[t + 1] * v(t + 1);
    const float delta = r(t) + gamma * next_v - v(t);
    adv = (1.0f - m[t] + m[t] * gamma_lam) * adv + m[t] * delta;
    advantages[base + t] = adv;
    returns[base + t] = adv + v(t);
  }
}

}  // namespace

cudaError_t launch_gae(const float* rewards, const float* values, const float* mask, int64_t B, int64_t T,
                       float gamma, float gamma_lam, float* advantages, float* returns, cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  gae_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(rewards, values, mask, T, gamma, gamma_lam,
                                                                 advantages, returns);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ppo_fast
