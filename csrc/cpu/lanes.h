// Row loops of the per-token CPU kernels in fixed lane blocks. A row [0, T) is cut into blocks
// of kBlock tokens; lane j of the block loop (`#pragma omp simd`, so one vector instruction per
// 8 or 16 lanes) takes tokens j, j + kBlock, ... and keeps its own partial sums, added in lane
// order at the end. A kernel's lane loop runs over all of a row's full blocks in one call. The
// last block is copied into zero-padded arrays and runs the same lane code, so masked padding
// after a row adds exact zeros to the same lanes: a row's sums (a sequence ratio, the
// statistics) are bitwise the same whatever its padding, and on every ISA build (the lane count
// does not depend on the vector width, and -std=c++20 contracts no a * b + c into an FMA).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ppo_fast {

constexpr int64_t kBlock = 16;

// A mask entry as float. Bool masks are read as their bytes (uint8_t: GCC does not vectorise loads
// of bool), never converted to a float tensor.
template <typename mask_t>
inline float mask_value(mask_t m) {
  return static_cast<float>(m);
}

// Partial sums of one statistic per lane, reduced in lane order.
struct LaneSum {
  float lane[kBlock] = {};
  float total() const {
    float t = 0.0f;
    for (int64_t j = 0; j < kBlock; ++j) t += lane[j];
    return t;
  }
};

// fn(t, j) for every token t of n_blocks full blocks, j = its lane: the lane loop of a kernel
// (fn inlined into one `omp simd` loop per block).
template <typename Fn>
__attribute__((always_inline)) inline void lane_blocks(int64_t n_blocks, Fn&& fn) {
  for (int64_t t0 = 0; t0 < n_blocks * kBlock; t0 += kBlock) {
#pragma omp simd
    for (int64_t j = 0; j < kBlock; ++j) fn(t0 + j, j);
  }
}

// The tail of a row (count < kBlock tokens) copied into a zero-padded block, and back.
template <typename T>
struct PaddedBlock {
  alignas(64) T values[kBlock];
  PaddedBlock(const T* src, int64_t count) {
    std::memset(values, 0, sizeof(values));
    if (src) std::memcpy(values, src, count * sizeof(T));
  }
};

// A row's mask as floats: a float mask as it is, a bool one (its bytes) converted into `buffer`.
template <typename mask_t>
inline const float* float_mask(const mask_t* m, int64_t T, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<mask_t, float>) {
    return m;
  } else {
    buffer.resize(T);
    float* out = buffer.data();
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) out[t] = mask_value(m[t]);
    return out;
  }
}

// fn(t0, n_blocks, padded): the row's full blocks as one span (t0 = 0), then its last tokens
// (T % kBlock of them) as one block that the caller runs on padded copies.
template <typename Fn>
inline void for_each_span(int64_t T, Fn&& fn) {
  const int64_t full = T - T % kBlock;
  if (full) fn(int64_t{0}, full / kBlock, false);
  if (full < T) fn(full, int64_t{1}, true);
}

}  // namespace ppo_fast
