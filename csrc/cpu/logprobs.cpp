// Log-probs and entropy from logits on the CPU: rows split over tasks (at::parallel_for), one
// sweep over a row (an online log-sum-exp per lane: row_exp_sums), in ATen vectors (vec_rows.h:
// 16 lanes with AVX-512, 8 with AVX2) with Sleef's exp and tanh. fp32 accumulation, lane sums
// in a fixed order. The softcap and the row statistics (log sum p^2, mean logit, label is the
// argmax) are template switches.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "logprobs_math.h"
#include "ops.h"
#include "vec_rows.h"

namespace ppo_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// x = z inv_t, or with a softcap c: x = tanh(z scale / c) (c inv_t); and dx/dz.
struct VecTransform {
  Vec inv_t, to_tanh, from_tanh, slope_scale;

  explicit VecTransform(const LogitTransform& tr)
      : inv_t(tr.inv_t), to_tanh(tr.scale / tr.softcap), from_tanh(tr.softcap * tr.inv_t),
        slope_scale(tr.scale * tr.inv_t) {}

  template <bool Softcap>
  Vec x(const Vec& z) const { return Softcap ? (z * to_tanh).tanh() * from_tanh : z * inv_t; }

  template <bool Softcap>
  Vec slope(const Vec& z) const {
    if (!Softcap) return inv_t;
    const Vec t = (z * to_tanh).tanh();
    return (Vec(1.0f) - t * t) * slope_scale;
  }
};

// x at column v, computed in a vector lane as the sweeps compute it (bitwise the same value).
template <typename scalar_t, bool Softcap>
float x_at(const scalar_t* row, int64_t v, const VecTransform& tr) {
  alignas(64) float lanes[kLanes];
  tr.x<Softcap>(load_lanes(row + v, 1, 0.0f)).store(lanes);
  return lanes[0];
}

// The max of x over columns [0, n) (-inf for n = 0); a NaN or +inf entry then makes
// exp(x - max) NaN, so the row's results are NaN.
template <typename scalar_t, bool Softcap>
float row_max(const scalar_t* __restrict row, int64_t n, const VecTransform& tr) {
  Vec m(-kInf);
  for (int64_t v = 0; v < n; v += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, n - v);
    const Vec x = tr.x<Softcap>(load_lanes(row + v, count, 0.0f));
    m = at::vec::maximum(m, count == kLanes ? x : Vec::set(Vec(-kInf), x, count));
  }
  return lane_max(m);
}

struct ExpSums {
  float max, d, s, q, x_sum;  // the max m of x; sum e, sum e (x - m), sum e^2, sum x; e = exp(x - m)
};

// Lane l's running max m_l and, relative to it, d_l = sum e, s_l = sum e (x - m_l), q_l = sum e^2.
// When a block raises m_l to m', the lane's sums are rescaled by f = exp(m_l - m'):
// d f, f (s + (m_l - m') d), q f^2. A lane with d = 0 stays 0 (f may be NaN there, -inf - -inf);
// s restarts from 0 where f = 0 too (the old max lies more than ~104 below, e.g. a finfo.min
// mask): (m_l - m') d may overflow there (-3.4e38 x 9 = -inf, and 0 x -inf = NaN).
struct LaneSums {
  Vec m{-kInf}, d{0.0f}, s{0.0f}, q{0.0f}, x_sum{0.0f};

  template <bool Stats>
  void raise_max(const Vec& m_new) {
    const Vec zero(0.0f), gap = m - m_new, f = gap.exp(), empty = d == zero;
    s = Vec::blendv(f * (s + gap * d), zero, empty | (f == zero));
    if (Stats) q = Vec::blendv(q * f * f, zero, empty);
    d = Vec::blendv(d * f, zero, empty);
    m = m_new;
  }
};

// One sweep over a row, read once from memory: per block of kBlockVecs vectors, the block's max
// (in registers), the lanes' rescaling where it raised their max (rare after a row's first
// blocks), then exp(x - m_l) into the lane sums; at the end the lanes are merged at the row's
// max. A NaN or +inf entry (and a row of -inf, or none) makes the results NaN, as exp(x - max)
// is NaN there. `next`: the row the task reads after this one (or nullptr), prefetched into L2.
template <typename scalar_t, bool Softcap, bool Stats>
ExpSums row_exp_sums(const scalar_t* __restrict row, int64_t V, const VecTransform& tr, const scalar_t* next) {
  constexpr int64_t kBlockVecs = 4;
  const Vec zero(0.0f), minus_inf(-kInf), lowest(std::numeric_limits<float>::lowest());
  LaneSums lanes;
  for (int64_t v0 = 0; v0 < V; v0 += kBlockVecs * kLanes) {
    Vec x[kBlockVecs], block_max = minus_inf;
    int64_t counts[kBlockVecs];
    for (int64_t k = 0; k < kBlockVecs; ++k) {
      const int64_t v = v0 + k * kLanes;
      if (next) __builtin_prefetch(next + v, 0, 2);  // a cache line per vector (fp32; bf16: half a line)
      counts[k] = std::clamp<int64_t>(V - v, 0, kLanes);
      x[k] = counts[k] ? tr.x<Softcap>(load_lanes(row + v, counts[k], 0.0f)) : zero;
      if (counts[k] < kLanes) x[k] = Vec::set(minus_inf, x[k], counts[k]);  // padding lanes: e = 0
      block_max = at::vec::maximum(block_max, x[k]);
    }
    const Vec m_new = at::vec::maximum(lanes.m, block_max);
    if ((m_new == lanes.m).zero_mask()) lanes.raise_max<Stats>(m_new);  // a lane's max rose (or is NaN)
    const Vec m = at::vec::maximum(lanes.m, lowest);  // a lane of -inf so far: its e are 0, not NaN
    for (int64_t k = 0; k < kBlockVecs; ++k) {
      const Vec centred = x[k] - m;
      const Vec e = centred.exp();
      lanes.d = lanes.d + e;
      lanes.s = lanes.s + Vec::blendv(zero, e * centred, e > zero);  // e (x - m) = 0 where e = 0 (x = -inf)
      if (Stats) {
        lanes.q = lanes.q + e * e;
        lanes.x_sum = lanes.x_sum + (counts[k] < kLanes ? Vec::set(zero, x[k], counts[k]) : x[k]);
      }
    }
  }
  const float max = lane_max(lanes.m);
  const float x_sum = Stats ? lane_sum(lanes.x_sum) : 0.0f;
  lanes.raise_max<Stats>(Vec(max));
  if (max == -kInf) return {max, kNaN, kNaN, kNaN, x_sum};  // no finite entry: exp(x - max) is NaN
  return {max, lane_sum(lanes.d), lane_sum(lanes.s), lane_sum(lanes.q), x_sum};
}

struct ForwardOut {
  const int64_t* labels;
  float *logp, *entropy, *norm, *stats;  // nullptr where not asked for; norm [N, 2], stats [N, 3]
};

template <typename scalar_t, bool Softcap, bool Stats>
void forward_rows(const at::Tensor& logits, const RowLayout& layout, const LogitTransform& transform,
                  int64_t ignore_index, const ForwardOut& out) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const VecTransform tr(transform);
  at::parallel_for(0, layout.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = layout.row(base, r);
      const int64_t y = out.labels ? out.labels[r] : -1;
      const bool in_range = y >= 0 && y < layout.vocab;
      const scalar_t* next = r + 1 < end ? layout.row(base, r + 1) : nullptr;
      const ExpSums sums = row_exp_sums<scalar_t, Softcap, Stats>(row, layout.vocab, tr, next);
      const float m = sums.max;
      const float log_d = std::log(sums.d);
      out.norm[2 * r] = m;  // lse = m + log d, kept apart: log p = (x - m) - log d stays exact for |m| >> 1
      out.norm[2 * r + 1] = log_d;
      if (out.entropy) out.entropy[r] = log_d - sums.s / sums.d;  // H = lse - E[x] = log d - E[x - m]
      const float x_y = in_range ? x_at<scalar_t, Softcap>(row, y, tr) : 0.0f;
      if (out.logp) {  // a label outside [0, V) is never read: NaN
        out.logp[r] = y == ignore_index ? 0.0f : in_range ? (x_y - m) - log_d : kNaN;
      }
      if (Stats) {
        float* st = out.stats + r * 3;
        const float before = in_range ? row_max<scalar_t, Softcap>(row, y, tr) : -kInf;  // the first maximum
        st[0] = std::log(sums.q) - 2.0f * log_d;  // log sum p^2
        st[1] = sums.x_sum / static_cast<float>(layout.vocab);
        st[2] = (in_range && y != ignore_index && x_y >= m && x_y > before) ? 1.0f : 0.0f;
      }
    }
  });
}

// d/dz at columns [v, v + count): logprobs_math.h's gradient, p = 0 contributing 0 to the
// entropy term; log p = (x - m) - log d (the row's norm).
template <typename scalar_t, bool Softcap>
Vec grad_lanes(const scalar_t* row, int64_t v, int64_t count, const VecTransform& tr, const float* norm,
               float g_logp, float g_entropy, float H, float indicator) {
  const Vec z = load_lanes(row + v, count, 0.0f), zero(0.0f);
  const Vec logp = (tr.x<Softcap>(z) - Vec(norm[0])) - Vec(norm[1]);
  const Vec p = logp.exp();
  const Vec entropy_term = Vec::blendv(zero, p * (logp + Vec(H)), p > zero);
  return logprobs_grad_of(p, entropy_term, Vec(indicator), Vec(g_logp), Vec(g_entropy), tr.slope<Softcap>(z));
}

template <typename scalar_t, bool Softcap>
void backward_rows(const at::Tensor& logits, const int64_t* labels, const RowLayout& layout, const float* norm,
                   const float* entropy, const float* grad_logp, const float* grad_entropy,
                   const LogitTransform& transform, int64_t ignore_index, scalar_t* grad) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t V = layout.vocab;
  const VecTransform tr(transform);
  at::parallel_for(0, layout.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = layout.row(base, r);
      scalar_t* out = grad + r * V;
      const int64_t y = labels ? labels[r] : -1;
      // A label outside [0, V) is another rank's column (a vocabulary shard): its -p g_logp still
      // reaches every column here, its indicator none.
      const bool has_label = y >= 0 && y < V && y != ignore_index;
      const float g_logp = (grad_logp && y != ignore_index) ? grad_logp[r] : 0.0f;
      const float g_entropy = grad_entropy ? grad_entropy[r] : 0.0f;
      const float H = grad_entropy ? entropy[r] : 0.0f;
      // The label's entry is computed before the sweep: `out` may be the logits buffer itself.
      float label_grad = 0.0f;
      if (has_label) {
        alignas(64) float lanes[kLanes];
        grad_lanes<scalar_t, Softcap>(row, y, 1, tr, norm + 2 * r, g_logp, g_entropy, H, 1.0f).store(lanes);
        label_grad = lanes[0];
      }
      for (int64_t v = 0; v < V; v += kLanes) {  // each chunk is read before it is written
        const int64_t count = std::min<int64_t>(kLanes, V - v);
        store_lanes(grad_lanes<scalar_t, Softcap>(row, v, count, tr, norm + 2 * r, g_logp, g_entropy, H, 0.0f), out + v,
                    count);
      }
      if (has_label) out[y] = static_cast<scalar_t>(label_grad);
    }
  });
}

// A new [N, V] buffer, backed by 2 MiB pages where the kernel allows (transparent huge pages in
// "madvise" mode): the backward's first write to each 4 KiB page of a fresh allocation is a
// page fault, which on a [2048, 32000] fp32 gradient costs more than the kernel itself.
at::Tensor fresh_gradient(int64_t n_rows, int64_t vocab, const at::TensorOptions& options) {
  at::Tensor grad = at::empty({n_rows, vocab}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + grad.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#endif
  return grad;
}

const float* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

LogitTransform transform_of(double inv_temperature, double scale, std::optional<double> softcap) {
  return {static_cast<float>(inv_temperature), static_cast<float>(scale),
          softcap.has_value() ? static_cast<float>(*softcap) : 1.0f, softcap.has_value()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout, double inv_temperature,
    double scale, std::optional<double> softcap, int64_t ignore_index, bool with_entropy, bool with_stats) {
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor norm = at::empty({layout.n_rows, 2}, f32);
  at::Tensor logp = labels.has_value() ? at::empty({layout.n_rows}, f32) : at::Tensor();
  at::Tensor entropy = with_entropy ? at::empty({layout.n_rows}, f32) : at::Tensor();
  at::Tensor stats = with_stats ? at::empty({layout.n_rows, 3}, f32) : at::Tensor();
  const ForwardOut out{labels.has_value() ? labels->data_ptr<int64_t>() : nullptr,
                       logp.defined() ? logp.data_ptr<float>() : nullptr,
                       entropy.defined() ? entropy.data_ptr<float>() : nullptr, norm.data_ptr<float>(),
                       stats.defined() ? stats.data_ptr<float>() : nullptr};
  const LogitTransform tr = transform_of(inv_temperature, scale, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward", [&] {
    if (tr.has_softcap) {
      with_stats ? forward_rows<scalar_t, true, true>(logits, layout, tr, ignore_index, out)
                 : forward_rows<scalar_t, true, false>(logits, layout, tr, ignore_index, out);
    } else {
      with_stats ? forward_rows<scalar_t, false, true>(logits, layout, tr, ignore_index, out)
                 : forward_rows<scalar_t, false, false>(logits, layout, tr, ignore_index, out);
    }
  });
  return {logp, entropy, norm, stats};
}

at::Tensor logprobs_backward(const at::Tensor& logits, const std::optional<at::Tensor>& labels, RowLayout layout,
                             const at::Tensor& norm, const std::optional<at::Tensor>& entropy,
                             const std::optional<at::Tensor>& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, double inv_temperature, double scale,
                             std::optional<double> softcap, int64_t ignore_index,
                             const std::optional<at::Tensor>& out) {
  at::Tensor grad = out.has_value() ? *out : fresh_gradient(layout.n_rows, layout.vocab, logits.options());
  TORCH_CHECK(grad.numel() == layout.n_rows * layout.vocab && grad.scalar_type() == logits.scalar_type() &&
                  grad.is_contiguous(),
              "logprobs_backward: out must be a contiguous [N, V] tensor of the logits' dtype");
  const int64_t* label_ptr = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const LogitTransform tr = transform_of(inv_temperature, scale, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward", [&] {
    auto run = [&](auto softcap_tag) {
      backward_rows<scalar_t, decltype(softcap_tag)::value>(
          logits, label_ptr, layout, norm.data_ptr<float>(), optional_ptr(entropy), optional_ptr(grad_logp),
          optional_ptr(grad_entropy), tr, ignore_index, grad.data_ptr<scalar_t>());
    };
    tr.has_softcap ? run(std::true_type{}) : run(std::false_type{});
  });
  return grad;
}

}  // namespace ppo_fast
