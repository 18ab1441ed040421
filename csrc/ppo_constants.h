// Numbers shared by the C++ and CUDA kernels and ppo_fast/ops/constants.py and rows.py (the Python
// side defines them; tests/ops/test_constants.py checks that this header agrees).
#pragma once

namespace ppo_fast {

constexpr float kLogRatioClamp = 20.0f;  // LOG_RATIO_CLAMP
constexpr float kK3Clamp = 10.0f;        // K3_CLAMP
constexpr double kWhitenEps = 1e-8;      // WHITEN_EPS

// Columns of the per-row statistics the loss kernels write (POLICY_ROW_STATS, VALUE_ROW_STATS).
constexpr int kRowLoss = 0;
constexpr int kRowTokens = 1;
constexpr int kRowClipped = 2;
constexpr int kRowNegLogRatio = 3;
constexpr int kRowLowerClipped = 4;
constexpr int kPolicyRowStats = 5;
constexpr int kValueRowStats = 3;

// Policy objectives (SURROGATE_CODES, RATIO_LEVEL_CODES).
constexpr int kSurrogateClip = 0;
constexpr int kSurrogateCispo = 1;
constexpr int kSurrogateGpg = 2;
constexpr int kSurrogateSapo = 3;
constexpr int kRatioToken = 0;
constexpr int kRatioSequence = 1;
constexpr int kRatioSequenceToken = 2;

// KL estimators (KL_K1 ... KL_K3_RAW of constants.py).
constexpr int kKlK1 = 0;
constexpr int kKlAbs = 1;
constexpr int kKlK2 = 2;
constexpr int kKlK3 = 3;
constexpr int kKlK3Raw = 4;

}  // namespace ppo_fast
