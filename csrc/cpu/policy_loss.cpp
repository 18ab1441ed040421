// The compiled policy objectives on the CPU (ppo_fast/ops/policy_loss.py; the per-token math in
// csrc/policy_math.h): the clip / cispo / gpg / sapo surrogates on a token, sequence or
// sequence-token ratio, with optional importance weights.
// Inputs arrive as contiguous float32 [B, T] (the mask bool or float); one task per row, the
// row's tokens in fixed lane blocks (lanes.h: vectorised, padding-invariant sums). Inputs at
// masked positions are read as 0 and max/clamp propagate NaN, as the reference does. The
// surrogate and the ratio level are template parameters: no branch on them per token.
#include <cmath>
#include <limits>

#include "cpu_checks.h"
#include "fast_math.h"
#include "lanes.h"
#include "ops.h"
#include "policy_math.h"
#include "ppo_constants.h"

namespace ppo_fast {
namespace {

using Constants = SurrogateConstants;

// policy_math.h's exp: the vectorisable one (a functor, inlined into the lane loops).
struct FastExp {
  __attribute__((always_inline)) float operator()(float x) const { return fast_exp(x); }
};

// A block of a row: kBlock tokens from these pointers (a row's own memory, or a padded copy),
// the mask as floats (a bool mask converted block by block: lanes.h).
struct Block {
  const float *lp, *old, *A, *w;  // w: per-token importance weights, or nullptr
  const float* m;
  float* dloss;  // nullptr without a gradient
};

struct RowSums {
  LaneSum loss, count, clipped, neg_delta, lower, ratio_grad, delta, n;
};

struct Ratio {
  float seq, w_row;  // the sequence ratio s (1 at token level); the row's weight without per-token ones
  bool seq_inside;
  // s in every lane: read from memory in the lane loop, as a token ratio would be. Used as a loop
  // invariant, GCC hoists tests on it (isnan) into scalar conditions it cannot vectorise selects on.
  alignas(64) float seq_lanes[kBlock];
  alignas(64) float slope_lanes[kBlock];  // d rho / d log_prob_t at sequence-token level: s inside the clamp, else 0
};

// Pass 1 of the sequence levels: the row's masked sum of log-ratios and its token count. Every
// lane's inputs are loaded (full blocks, or padded copies) and then selected: no masked loads.
inline void log_ratio_block(const Block& in, int64_t n_blocks, RowSums& sums) {
  const float *__restrict m = in.m, *__restrict lp = in.lp, *__restrict old = in.old;
  float *__restrict delta = sums.delta.lane, *__restrict n = sums.n.lane;
  for (int64_t t0 = 0; t0 < n_blocks * kBlock; t0 += kBlock) {
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) {
      const float mt = m[t0 + j], diff = lp[t0 + j] - old[t0 + j];
      delta[j] += mt != 0.0f ? diff : 0.0f;
      n[j] += mt;
    }
  }
}

// Pass 2: each token's loss, statistics and gradient (WithGrad), weighted per token (HasW) or per row.
template <int Surrogate, int Level, bool WithGrad, bool HasW>
inline void loss_block(const Block& in, int64_t n_blocks, const Ratio& r, const Constants& constants,
                       RowSums& sums) {
  // Everything the loop reads or accumulates as local restrict pointers and values: through the
  // structs, a store to a sum could (for the compiler) move a pointer, and the loop stays scalar.
  const float *__restrict m = in.m, *__restrict A = in.A, *__restrict lp_in = in.lp, *__restrict old = in.old;
  const float *__restrict w_in = in.w;
  float* __restrict dloss = in.dloss;
  float *__restrict loss_sum = sums.loss.lane, *__restrict count = sums.count.lane;
  float *__restrict clipped = sums.clipped.lane, *__restrict neg_delta = sums.neg_delta.lane;
  float *__restrict lower = sums.lower.lane, *__restrict ratio_grad = sums.ratio_grad.lane;
  const float *__restrict seq_lanes = r.seq_lanes, *__restrict slope_lanes = r.slope_lanes;
  const float w_row = r.w_row;
  const Constants c = constants;
  for (int64_t t0 = 0; t0 < n_blocks * kBlock; t0 += kBlock) {
#pragma omp simd
  for (int64_t j = 0; j < kBlock; ++j) {
    const int64_t t = t0 + j;
    const float mt = m[t], A_raw = A[t], lp_raw = lp_in[t], old_raw = old[t];
    const float w_raw = HasW ? w_in[t] : w_row;
    const bool valid = mt != 0.0f;
    const float adv = valid ? A_raw : 0.0f, lp = valid ? lp_raw : 0.0f;
    const float raw = valid ? lp - old_raw : 0.0f;
    const float w = valid ? mt * w_raw : 0.0f;
    const float delta = clamp_to(raw, -kLogRatioClamp, kLogRatioClamp);
    const float ratio = Level == kRatioToken ? exp_in_range(delta) : seq_lanes[j];
    // outside the clamp the ratio has no gradient (delta != raw there, and for a NaN); inside,
    // the slope is the ratio (> 0)
    const float ratio_slope = Level == kRatioToken ? (delta == raw ? ratio : 0.0f) : slope_lanes[j];
    const TokenTerms term = surrogate<Surrogate>(ratio, lp, adv, w, c, FastExp{});
    if constexpr (WithGrad) {
      if constexpr (Level == kRatioSequence) {
        ratio_grad[j] += valid ? term.d_ratio : 0.0f;
        dloss[t] = valid ? term.d_log_prob : 0.0f;
      } else {
        const float through_ratio = ratio_slope != 0.0f ? term.d_ratio * ratio_slope : 0.0f;
        dloss[t] = valid ? through_ratio + term.d_log_prob : 0.0f;
      }
    }
    loss_sum[j] += valid ? w * term.loss : 0.0f;
    count[j] += mt;
    clipped[j] += mt * term.clipped;
    neg_delta[j] -= mt * delta;
    lower[j] += mt * term.lower;
  }
  }
}

struct Rows {
  const float *lp, *old, *A, *w;  // w: nullptr, or importance weights [B, T] (w_per_token) or [B, 1]
  const void* m;
  int64_t T;
  bool w_per_token;
  float* dloss;  // nullptr without a gradient
  float* stats;
};

// fn(block, n_blocks) over row b: its full blocks in place, then its last tokens through
// zero-padded copies (their gradient copied back). `mask` holds the row's mask as floats.
template <typename Fn>
void row_spans(const Rows& in, int64_t b, const float* mask, bool with_grad, Fn&& fn) {
  const int64_t at = b * in.T;
  const float* w = in.w && in.w_per_token ? in.w + at : nullptr;
  for_each_span(in.T, [&](int64_t t0, int64_t n_blocks, bool padded) {
    float* dloss = with_grad && in.dloss ? in.dloss + at + t0 : nullptr;
    if (!padded) {
      return fn(Block{in.lp + at, in.old + at, in.A + at, w, mask, dloss}, n_blocks);
    }
    const int64_t count = in.T - t0;
    PaddedBlock<float> lp(in.lp + at + t0, count), old(in.old + at + t0, count), A(in.A + at + t0, count),
        wp(w ? w + t0 : nullptr, count), m(mask + t0, count), grad(nullptr, count);
    fn(Block{lp.values, old.values, A.values, w ? wp.values : nullptr, m.values, dloss ? grad.values : nullptr}, 1);
    if (dloss) std::memcpy(dloss, grad.values, count * sizeof(float));
  });
}

template <int Surrogate, int Level, typename mask_t>
void policy_row(const Rows& in, int64_t b, const Constants& c, std::vector<float>& mask_buffer) {
  const float* mask = float_mask(static_cast<const mask_t*>(in.m) + b * in.T, in.T, mask_buffer);
  RowSums sums;
  Ratio r{1.0f, in.w && !in.w_per_token ? in.w[b] : 1.0f, true, {}, {}};
  float n = 0.0f;
  if constexpr (Level != kRatioToken) {  // pass 1: s = exp(clamp(mean log-ratio))
    row_spans(in, b, mask, false, [&](const Block& blk, int64_t n_blocks) { log_ratio_block(blk, n_blocks, sums); });
    n = sums.n.total();
    const float mean = sums.delta.total() / (n > 1 ? n : 1);
    r.seq = std::exp(clamp_to(mean, -kLogRatioClamp, kLogRatioClamp));
    r.seq_inside = mean >= -kLogRatioClamp && mean <= kLogRatioClamp;
    for (int64_t j = 0; j < kBlock; ++j) r.seq_lanes[j] = r.seq, r.slope_lanes[j] = r.seq_inside ? r.seq : 0.0f;
  }
  const bool with_grad = in.dloss != nullptr, has_w = in.w && in.w_per_token;
  row_spans(in, b, mask, true, [&](const Block& blk, int64_t n_blocks) {
    if (with_grad) {
      has_w ? loss_block<Surrogate, Level, true, true>(blk, n_blocks, r, c, sums)
            : loss_block<Surrogate, Level, true, false>(blk, n_blocks, r, c, sums);
    } else {
      has_w ? loss_block<Surrogate, Level, false, true>(blk, n_blocks, r, c, sums)
            : loss_block<Surrogate, Level, false, false>(blk, n_blocks, r, c, sums);
    }
  });
  if constexpr (Level == kRatioSequence) {  // pass 3: d s / d log_prob_t = s / n to every valid token
    if (in.dloss) {
      const float coef = r.seq_inside ? r.seq / (n > 1 ? n : 1) * sums.ratio_grad.total() : 0.0f;
      float* dloss = in.dloss + b * in.T;
#pragma omp simd
      for (int64_t t = 0; t < in.T; ++t) dloss[t] += mask[t] != 0.0f ? mask[t] * coef : 0.0f;
    }
  }
  float* s = in.stats + b * kPolicyRowStats;
  s[kRowLoss] = sums.loss.total(), s[kRowTokens] = sums.count.total(), s[kRowClipped] = sums.clipped.total();
  s[kRowNegLogRatio] = sums.neg_delta.total(), s[kRowLowerClipped] = sums.lower.total();
}

template <int Surrogate, int Level>
void policy_rows(const Rows& in, int64_t B, const Constants& c, bool bool_mask) {
  at::parallel_for(0, B, rows_per_task(B, in.T), [&](int64_t begin, int64_t end) {
    std::vector<float> mask_buffer;  // a bool mask's row as floats, reused over the task's rows
    for (int64_t b = begin; b < end; ++b) {
      bool_mask ? policy_row<Surrogate, Level, uint8_t>(in, b, c, mask_buffer)
                : policy_row<Surrogate, Level, float>(in, b, c, mask_buffer);
    }
  });
}

template <int Surrogate>
void dispatch_level(int64_t level, const Rows& in, int64_t B, const Constants& c, bool bool_mask) {
  switch (level) {
    case kRatioToken: return policy_rows<Surrogate, kRatioToken>(in, B, c, bool_mask);
    case kRatioSequence: return policy_rows<Surrogate, kRatioSequence>(in, B, c, bool_mask);
    case kRatioSequenceToken: return policy_rows<Surrogate, kRatioSequenceToken>(in, B, c, bool_mask);
    default: TORCH_CHECK(false, "policy_loss_forward: unknown ratio level code ", level);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> policy_loss_forward(const at::Tensor& log_prob, const at::Tensor& old_log_prob,
                                                       const at::Tensor& advantages, const at::Tensor& mask,
                                                       const std::optional<at::Tensor>& is_weights,
                                                       int64_t surrogate, int64_t ratio_level, double clip_low,
                                                       double clip_high, std::optional<double> dual_clip,
                                                       double tau_pos, double tau_neg, bool needs_grad) {
  const auto shape = check_f32_rows(
      {{log_prob, "log_prob"}, {old_log_prob, "old_log_prob"}, {advantages, "advantages"}, {mask, "mask"}});
  const int64_t B = shape.first, T = shape.second;
  at::Tensor stats = at::empty({B, kPolicyRowStats}, log_prob.options());
  at::Tensor dloss = needs_grad ? at::empty_like(log_prob) : at::Tensor();
  Rows in{log_prob.data_ptr<float>(), old_log_prob.data_ptr<float>(), advantages.data_ptr<float>(), nullptr,
          mask.data_ptr(), T, false, needs_grad ? dloss.data_ptr<float>() : nullptr, stats.data_ptr<float>()};
  if (is_weights.has_value()) {
    const at::Tensor& w = *is_weights;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == B &&
                    (w.size(1) == T || w.size(1) == 1),
                "is_weights: expected a contiguous float32 [B, T] or [B, 1] tensor, got ", w.sizes());
    in.w = w.data_ptr<float>(), in.w_per_token = w.size(1) == T;
  }
  const Constants c{1.0f - static_cast<float>(clip_low), 1.0f + static_cast<float>(clip_high),
                    dual_clip.has_value() ? static_cast<float>(*dual_clip) : std::numeric_limits<float>::infinity(),
                    static_cast<float>(tau_pos), static_cast<float>(tau_neg)};
  const bool bool_mask = mask.scalar_type() == at::kBool;
  switch (surrogate) {
    case kSurrogateClip: dispatch_level<kSurrogateClip>(ratio_level, in, B, c, bool_mask); break;
    case kSurrogateCispo: dispatch_level<kSurrogateCispo>(ratio_level, in, B, c, bool_mask); break;
    case kSurrogateGpg: dispatch_level<kSurrogateGpg>(ratio_level, in, B, c, bool_mask); break;
    case kSurrogateSapo: dispatch_level<kSurrogateSapo>(ratio_level, in, B, c, bool_mask); break;
    default: TORCH_CHECK(false, "policy_loss_forward: unknown surrogate code ", surrogate);
  }
  return {stats, dloss};
}

}  // namespace ppo_fast
