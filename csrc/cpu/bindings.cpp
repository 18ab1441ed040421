// pybind11 bindings of the CPU kernels: the module ppo_fast._C.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

namespace {

ppo_fast::RowLayout layout(int64_t n_rows, int64_t vocab, int64_t rows_per_batch, int64_t stride_batch,
                           int64_t stride_row) {
  return {n_rows, vocab, rows_per_batch, stride_batch, stride_row};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ppo_fast C++ (CPU) kernels";
  m.def(
      "logprobs_forward",
      [](const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t n_rows, int64_t vocab,
         int64_t rows_per_batch, int64_t stride_batch, int64_t stride_row, double inv_temperature, double scale,
         std::optional<double> softcap, int64_t ignore_index, bool with_entropy, bool with_stats) {
        return ppo_fast::logprobs_forward(logits, labels, layout(n_rows, vocab, rows_per_batch, stride_batch, stride_row),
                                          inv_temperature, scale, softcap, ignore_index, with_entropy, with_stats);
      });
  m.def(
      "logprobs_backward",
      [](const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t n_rows, int64_t vocab,
         int64_t rows_per_batch, int64_t stride_batch, int64_t stride_row, const at::Tensor& norm,
         const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logp,
         const std::optional<at::Tensor>& grad_entropy, double inv_temperature, double scale,
         std::optional<double> softcap, int64_t ignore_index, const std::optional<at::Tensor>& out) {
        return ppo_fast::logprobs_backward(logits, labels,
                                           layout(n_rows, vocab, rows_per_batch, stride_batch, stride_row), norm,
                                           entropy, grad_logp, grad_entropy, inv_temperature, scale, softcap,
                                           ignore_index, out);
      });
  m.def("gae_forward", &ppo_fast::gae_forward);
  m.def("policy_loss_forward", &ppo_fast::policy_loss_forward);
  m.def("value_loss_forward", &ppo_fast::value_loss_forward);
  m.def("kl_forward", &ppo_fast::kl_forward);
  m.def("kl_backward", &ppo_fast::kl_backward);
  m.def("compute_rewards_forward", &ppo_fast::compute_rewards_forward);
  m.def("masked_row_sums_forward", &ppo_fast::masked_row_sums_forward);
  m.def("masked_whiten_forward", &ppo_fast::masked_whiten_forward);
  m.def("exp_values", &ppo_fast::exp_values);
}
