"""csrc/ppo_constants.h repeats ppo_fast/ops/constants.py for the C++ and CUDA kernels; they agree."""
import os
import re

from ppo_fast.ops import constants

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "ppo_constants.h")


def header_values():
    text = open(HEADER).read()
    return {name: float(value) for name, value in re.findall(r"constexpr (?:int|float) (k\w+) = ([-\d.]+)f?;", text)}


def test_header_matches_python():
    header = header_values()
    expected = {
        "kLogRatioClamp": constants.LOG_RATIO_CLAMP, "kK3Clamp": constants.K3_CLAMP,
        "kRowLoss": constants.ROW_LOSS, "kRowTokens": constants.ROW_TOKENS, "kRowClipped": constants.ROW_CLIPPED,
        "kRowNegLogRatio": constants.ROW_NEG_LOG_RATIO, "kRowLowerClipped": constants.ROW_LOWER_CLIPPED,
        "kPolicyRowStats": len(constants.POLICY_ROW_STATS), "kValueRowStats": len(constants.VALUE_ROW_STATS),
    }
    assert header == expected


def test_row_stat_columns_are_named_once():
    names = constants.POLICY_ROW_STATS
    assert [names.index(n) for n in ("loss", "tokens", "clipped", "neg_log_ratio", "lower_clipped")] == [
        constants.ROW_LOSS, constants.ROW_TOKENS, constants.ROW_CLIPPED, constants.ROW_NEG_LOG_RATIO,
        constants.ROW_LOWER_CLIPPED]
    assert constants.VALUE_ROW_STATS == names[:3]
