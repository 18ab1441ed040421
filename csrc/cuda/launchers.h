// Launchers of the CUDA kernels: raw pointers and a stream, no torch types, so that
//   nvcc -std=c++17 -gencode=arch=compute_90,code=sm_90 -Icsrc -c csrc/cuda/<file>.cu
// compiles without a CUDA build of torch. csrc/cuda/bindings.cpp wraps them for torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "logprobs_math.h"  // LogitTransform
#include "row_layout.h"

namespace ppo_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// logp (nullptr without labels), entropy (nullptr when not wanted): float32 [n_rows]; norm: float32
// [n_rows, 2], the row's max m of x and ln sum exp(x - m) (lse = m + ln d, kept apart for the backward);
// stats (nullptr when not wanted): float32 [n_rows, 3], log sum p^2, mean logit, label is the argmax.
cudaError_t launch_logprobs_forward(const void* logits, DType dtype, const int64_t* labels, RowLayout layout,
                                    LogitTransform tr, int64_t ignore_index, float* logp, float* entropy, float* norm,
                                    float* stats, cudaStream_t stream);

// grad_logits: contiguous [n_rows, V] of dtype. grad_logp / grad_entropy may be nullptr.
cudaError_t launch_logprobs_backward(const void* logits, DType dtype, const int64_t* labels, RowLayout layout,
                                     const float* norm, const float* entropy, const float* grad_logp,
                                     const float* grad_entropy, LogitTransform tr, int64_t ignore_index,
                                     void* grad_logits, cudaStream_t stream);

// All float32 contiguous [B, T].
cudaError_t launch_gae(const float* rewards, const float* values, const float* mask, int64_t B, int64_t T,
                       float gamma, float gamma_lam, float* advantages, float* returns, cudaStream_t stream);

}  // namespace cuda
}  // namespace ppo_fast
