// Torch-facing wrappers of the CUDA launchers: the module ppo_fast._C_cuda. Same Python
// signatures as the CPU module ppo_fast._C, so ppo_fast/ops/ calls either one.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cuda/launchers.h"

namespace {

using ppo_fast::cuda::DType;
using ppo_fast::RowLayout;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "logits: expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) { TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err)); }

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

ppo_fast::LogitTransform transform_of(double inv_temperature, double scale, std::optional<double> softcap) {
  return {static_cast<float>(inv_temperature), static_cast<float>(scale),
          softcap.has_value() ? static_cast<float>(*softcap) : 1.0f, softcap.has_value()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t n_rows, int64_t vocab,
    int64_t rows_per_batch, int64_t stride_batch, int64_t stride_row, double inv_temperature, double scale,
    std::optional<double> softcap, int64_t ignore_index, bool with_entropy, bool with_stats) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor norm = at::empty({n_rows, 2}, f32);
  at::Tensor logp = labels.has_value() ? at::empty({n_rows}, f32) : at::Tensor();
  at::Tensor entropy = with_entropy ? at::empty({n_rows}, f32) : at::Tensor();
  at::Tensor stats = with_stats ? at::empty({n_rows, 3}, f32) : at::Tensor();
  check(ppo_fast::cuda::launch_logprobs_forward(
            logits.data_ptr(), dtype_of(logits), ptr_or_null<int64_t>(labels),
            RowLayout{n_rows, vocab, rows_per_batch, stride_batch, stride_row},
            transform_of(inv_temperature, scale, softcap), ignore_index,
            logp.defined() ? logp.data_ptr<float>() : nullptr,
            entropy.defined() ? entropy.data_ptr<float>() : nullptr, norm.data_ptr<float>(),
            stats.defined() ? stats.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream()),
        "logprobs_forward");
  return {logp, entropy, norm, stats};
}

at::Tensor logprobs_backward(const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t n_rows,
                             int64_t vocab, int64_t rows_per_batch, int64_t stride_batch, int64_t stride_row,
                             const at::Tensor& norm, const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double inv_temperature, double scale,
                             std::optional<double> softcap, int64_t ignore_index,
                             const std::optional<at::Tensor>& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  // The kernel reads logits through the read-only cache: the gradient may not overwrite them.
  TORCH_CHECK(!out.has_value() || out->data_ptr() != logits.data_ptr(),
              "logprobs_backward: the CUDA kernel cannot write the gradient into the logits buffer");
  at::Tensor grad = out.has_value() ? *out : at::empty({n_rows, vocab}, logits.options());
  TORCH_CHECK(grad.numel() == n_rows * vocab && grad.scalar_type() == logits.scalar_type() && grad.is_contiguous(),
              "logprobs_backward: out must be a contiguous [N, V] tensor of the logits' dtype");
  check(ppo_fast::cuda::launch_logprobs_backward(
            logits.data_ptr(), dtype_of(logits), ptr_or_null<int64_t>(labels),
            RowLayout{n_rows, vocab, rows_per_batch, stride_batch, stride_row}, norm.data_ptr<float>(),
            ptr_or_null<float>(entropy), ptr_or_null<float>(grad_logp), ptr_or_null<float>(grad_entropy),
            transform_of(inv_temperature, scale, softcap), ignore_index, grad.data_ptr(),
            c10::cuda::getCurrentCUDAStream()),
        "logprobs_backward");
  return grad;
}

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  for (const at::Tensor* t : {&rewards, &values, &mask})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2,
                "gae_forward: expected contiguous float32 [B, T] CUDA tensors");
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  check(ppo_fast::cuda::launch_gae(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(),
                                   rewards.size(0), rewards.size(1), static_cast<float>(gamma),
                                   static_cast<float>(gamma * lam), adv.data_ptr<float>(), ret.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream()),
        "gae");
  return {adv, ret};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ppo_fast CUDA kernels";
  m.def("logprobs_forward", &logprobs_forward);
  m.def("logprobs_backward", &logprobs_backward);
  m.def("gae_forward", &gae_forward);
}
