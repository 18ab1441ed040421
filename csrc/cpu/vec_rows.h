// ATen's CPU vectors for the row kernels: at::vec::Vectorized<float> is 16 lanes in the AVX-512
// build, 8 in the AVX2 build and a plain array elsewhere (the CPU_CAPABILITY the module was
// compiled for, setup.py), its exp / tanh Sleef's (1.0 ulp). A row is read in chunks of one
// vector; the last chunk is padded with a fill value, so every lane of every chunk runs the
// same code and lane sums are reduced in one fixed order.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "cpu_checks.h"

namespace ppo_fast {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Elements [0, count) of p as float lanes (count <= kLanes), the other lanes `fill`.
template <typename scalar_t>
inline Vec load_lanes(const scalar_t* p, int64_t count, float fill) {
  if (count == kLanes) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return Vec::loadu(p);
    } else if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {  // bf16, fp16
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    }
  }
  alignas(64) float lanes[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) lanes[i] = i < count ? static_cast<float>(p[i]) : fill;
  return Vec::loadu(lanes);
}

// The first `count` lanes of v into p, in p's dtype.
template <typename scalar_t>
inline void store_lanes(const Vec& v, scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(p, static_cast<int>(count));
  } else if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {  // double: element by element
    alignas(64) float lanes[kLanes];
    v.store(lanes);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<scalar_t>(lanes[i]);
  } else {
    alignas(64) float lanes[kLanes];
    v.store(lanes);
    at::vec::convert(lanes, p, count);
  }
}

// Lane reductions in a fixed order (lane 0, 1, ...): a row's result is the same whatever else runs.
inline float lane_sum(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

inline float lane_max(const Vec& v) {  // NaN if a lane is NaN
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kLanes; ++i) m = nan_max(lanes[i], m);
  return m;
}

}  // namespace ppo_fast
