// Masked row sums and masked whitening on the CPU (math: ppo_fast/ops/masked.py): the lane
// blocks of lanes.h, so a row's sums do not depend on its padding; the statistics of whitening
// are the row sums added in float64 in row order, as the Triton launcher does.
#include <cmath>

#include "cpu_checks.h"
#include "lanes.h"
#include "ops.h"
#include "ppo_constants.h"

namespace ppo_fast {
namespace {

struct MaskedSums {
  LaneSum total, count, squares;
};

// Sums over n_blocks full blocks of m (x - c), m and m (x - c)^2; masked entries read as 0.
inline void sums_block(const float* __restrict x, const float* __restrict m, int64_t n_blocks, float center,
                       MaskedSums& sums) {
  float *__restrict total = sums.total.lane, *__restrict count = sums.count.lane;
  float* __restrict squares = sums.squares.lane;
  lane_blocks(n_blocks, [&](int64_t t, int64_t j) __attribute__((always_inline)) {
    const float mt = m[t], xc = mt != 0.0f ? x[t] - center : 0.0f;
    total[j] += mt * xc;
    count[j] += mt;
    squares[j] += mt * xc * xc;
  });
}

void row_sums(const float* x, const float* m, int64_t T, float center, float* out) {
  MaskedSums sums;
  for_each_span(T, [&](int64_t t0, int64_t n_blocks, bool padded) {
    if (!padded) return sums_block(x, m, n_blocks, center, sums);
    PaddedBlock<float> xp(x + t0, T - t0), mp(m + t0, T - t0);
    sums_block(xp.values, mp.values, 1, center, sums);
  });
  out[0] = sums.total.total(), out[1] = sums.count.total(), out[2] = sums.squares.total();
}

// [B, 3] float32: per row (sum m (x - c), sum m, sum m (x - c)^2).
at::Tensor all_row_sums(const at::Tensor& x, const at::Tensor& mask, float center) {
  const auto shape = check_f32_rows({{x, "x"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor out = at::empty({B, 3}, x.options());
  const float* xs = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool bool_mask = mask.scalar_type() == at::kBool;
  at::parallel_for(0, B, rows_per_task(B, T), [&](int64_t begin, int64_t end) {
    std::vector<float> mask_buffer;
    for (int64_t b = begin; b < end; ++b) {
      const float* m = bool_mask ? float_mask(static_cast<const uint8_t*>(mask.data_ptr()) + b * T, T, mask_buffer)
                                 : mask.data_ptr<float>() + b * T;
      row_sums(xs + b * T, m, T, center, o + b * 3);
    }
  });
  return out;
}

// The three columns of the row sums added over rows in float64, in row order.
void column_totals(const at::Tensor& rows, double totals[3]) {
  const float* r = rows.data_ptr<float>();
  totals[0] = totals[1] = totals[2] = 0.0;
  for (int64_t b = 0; b < rows.size(0); ++b)
    for (int k = 0; k < 3; ++k) totals[k] += r[b * 3 + k];
}

}  // namespace

at::Tensor masked_row_sums_forward(const at::Tensor& x, const at::Tensor& mask) {
  return all_row_sums(x, mask, 0.0f);
}

at::Tensor masked_whiten_forward(const at::Tensor& x, const at::Tensor& mask, bool shift_mean) {
  double first[3], second[3];
  column_totals(all_row_sums(x, mask, 0.0f), first);
  const double n = first[1], n_or_1 = n > 1.0 ? n : 1.0;
  const float center = static_cast<float>(first[0] / n_or_1);
  column_totals(all_row_sums(x, mask, center), second);  // S1, n, S2 about the center
  const double offset = second[0] / n_or_1;
  const double var = (second[2] - second[0] * offset) / (n - 1.0 > 1.0 ? n - 1.0 : 1.0);
  const float off = static_cast<float>(offset);
  const float inv_std = static_cast<float>(1.0 / std::sqrt((var > 0.0 ? var : 0.0) + kWhitenEps));
  const float back = center + off;  // added back when the mean is kept
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
    if (shift_mean) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) o[i] = ((in[i] - center) - off) * inv_std;
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) o[i] = ((in[i] - center) - off) * inv_std + back;
    }
  });
  return out;
}

}  // namespace ppo_fast
