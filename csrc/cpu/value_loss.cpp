// The clipped value loss on the CPU (math: ppo_fast/ops/value_loss.py); the layout and rules
// of policy_loss.cpp (fixed lane blocks, lanes.h). v_c = clamp(v, old - clip, old + clip) is v
// itself inside the range.
#include "cpu_checks.h"
#include "lanes.h"
#include "ops.h"
#include "ppo_constants.h"

namespace ppo_fast {
namespace {

struct ValueSums {
  LaneSum loss, count, clipped;
};

// Every lane's inputs are loaded (full blocks, or padded copies) and then selected: no masked
// loads, no branch, one vector instruction per lane group.
template <bool WithGrad>
inline void value_block(const float* __restrict v_in, const float* __restrict old_in, const float* __restrict R_in,
                        const float* __restrict m, int64_t n_blocks, float cl, float* __restrict d_out,
                        ValueSums& sums) {
  float *__restrict loss_sum = sums.loss.lane, *__restrict count = sums.count.lane;
  float* __restrict clipped = sums.clipped.lane;
  lane_blocks(n_blocks, [&](int64_t t, int64_t j) __attribute__((always_inline)) {
    const float mt = m[t], v_raw = v_in[t], old_raw = old_in[t], R_raw = R_in[t];
    const bool valid = mt != 0.0f;
    const float v = valid ? v_raw : 0.0f, old = valid ? old_raw : 0.0f, R = valid ? R_raw : 0.0f;
    const float lo = old - cl, hi = old + cl;
    const float vc = nan_clamp(v, lo, hi);
    const float l1 = (v - R) * (v - R), l2 = (vc - R) * (vc - R);
    if constexpr (WithGrad) {
      const float inside = v >= lo ? (v <= hi ? 2.0f * (vc - R) : 0.0f) : 0.0f;  // clipped: no gradient
      // the larger term's gradient; where either is NaN (no order) both terms', as autograd of
      // the reference's max gives: NaN for a NaN l1, the unclipped one for a NaN bound (old)
      const float d1 = 2.0f * (v - R);
      d_out[t] = mt * (l2 > l1 ? inside : (l1 >= l2 ? d1 : d1 + inside));
    }
    loss_sum[j] += mt * nan_max(l1, l2);
    count[j] += mt;
    clipped[j] += mt * (l2 > l1 ? 1.0f : 0.0f);
  });
}

template <bool WithGrad>
void value_row(const float* v, const float* old, const float* R, const float* m, int64_t T, float cl, float* d,
               float* stats) {
  ValueSums sums;
  for_each_span(T, [&](int64_t t0, int64_t n_blocks, bool padded) {
    if (!padded) return value_block<WithGrad>(v, old, R, m, n_blocks, cl, d, sums);
    const int64_t count = T - t0;
    PaddedBlock<float> vp(v + t0, count), op(old + t0, count), Rp(R + t0, count), mp(m + t0, count),
        dp(nullptr, count);
    value_block<WithGrad>(vp.values, op.values, Rp.values, mp.values, 1, cl, dp.values, sums);
    if (WithGrad) std::memcpy(d + t0, dp.values, count * sizeof(float));
  });
  stats[kRowLoss] = sums.loss.total(), stats[kRowTokens] = sums.count.total();
  stats[kRowClipped] = sums.clipped.total();
}

template <typename mask_t>
void value_row(const float* v, const float* old, const float* R, const mask_t* m, int64_t T, float cl, float* d,
               float* stats, std::vector<float>& mask_buffer) {
  const float* mask = float_mask(m, T, mask_buffer);
  d ? value_row<true>(v, old, R, mask, T, cl, d, stats) : value_row<false>(v, old, R, mask, T, cl, d, stats);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> value_loss_forward(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& mask,
                                                      double clip, bool needs_grad) {
  const auto shape =
      check_f32_rows({{values, "values"}, {old_values, "old_values"}, {returns, "returns"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor stats = at::empty({B, kValueRowStats}, values.options());
  at::Tensor dloss = needs_grad ? at::empty_like(values) : at::Tensor();
  const float cl = static_cast<float>(clip);
  const float *v = values.data_ptr<float>(), *old = old_values.data_ptr<float>(), *R = returns.data_ptr<float>();
  float* d = needs_grad ? dloss.data_ptr<float>() : nullptr;
  float* s = stats.data_ptr<float>();
  const bool bool_mask = mask.scalar_type() == at::kBool;
  const void* m = mask.data_ptr();
  at::parallel_for(0, B, rows_per_task(B, T), [&](int64_t begin, int64_t end) {
    std::vector<float> mask_buffer;  // a bool mask's row as floats, reused over the task's rows
    for (int64_t b = begin; b < end; ++b) {
      const int64_t at = b * T;
      float* d_row = d ? d + at : nullptr;
      if (bool_mask) {
        value_row(v + at, old + at, R + at, static_cast<const uint8_t*>(m) + at, T, cl, d_row, s + b * kValueRowStats,
                  mask_buffer);
      } else {
        value_row(v + at, old + at, R + at, static_cast<const float*>(m) + at, T, cl, d_row, s + b * kValueRowStats,
                  mask_buffer);
      }
    }
  });
  return {stats, dloss};
}

}  // namespace ppo_fast
