"""Numbers the kernels and the reference share, each defined once here.

The C++ and CUDA kernels read the same values from csrc/ppo_constants.h
(tests/ops/test_constants.py checks that the two agree).
"""
# The log-ratio log pi - log pi_old (policy loss) and ref - log pi (k3) are clamped to
# [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp, so exp never overflows fp32.
LOG_RATIO_CLAMP = 20.0
# k3 / low_var_kl values are clamped to [-K3_CLAMP, K3_CLAMP] (verl's convention).
K3_CLAMP = 10.0
# masked_whiten: (x - mean) * rsqrt(var + WHITEN_EPS).
WHITEN_EPS = 1e-8
# group_advantages (grpo): (s - mean) / (std + GROUP_STD_EPS).
GROUP_STD_EPS = 1e-6

# The columns of the loss kernels' per-row statistics are in ppo_fast/ops/rows.py.

# KL estimators: the names users pass, and the code the kernels branch on.
KL_ESTIMATOR_CODES = {"k1": 0, "kl": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3, "k3_raw": 4}
KL_K1, KL_ABS, KL_K2, KL_K3, KL_K3_RAW = range(5)

# Policy objectives (ppo_fast.ops.reference.SURROGATES, RATIO_LEVELS): the codes the kernels
# specialise on (a compile-time switch, never a branch per token).
SURROGATE_CODES = {"clip": 0, "cispo": 1, "gpg": 2, "sapo": 3}
RATIO_LEVEL_CODES = {"token": 0, "sequence": 1, "sequence-token": 2}
