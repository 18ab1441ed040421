"""csrc/ppo_constants.h repeats ppo_fast/ops/constants.py and the row-statistics columns of
ppo_fast/ops/rows.py for the C++ and CUDA kernels; they agree."""
import os
import re

from ppo_fast.ops import constants, rows

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "ppo_constants.h")


def header_values():
    text = open(HEADER).read()
    pattern = r"constexpr (?:int|float|double) (k\w+) = ([-\d.e]+)f?;"
    return {name: float(value) for name, value in re.findall(pattern, text)}


def test_header_matches_python():
    header = header_values()
    expected = {
        "kLogRatioClamp": constants.LOG_RATIO_CLAMP, "kK3Clamp": constants.K3_CLAMP, "kWhitenEps": constants.WHITEN_EPS,
        "kRowLoss": rows.ROW_LOSS, "kRowTokens": rows.ROW_TOKENS, "kRowClipped": rows.ROW_CLIPPED,
        "kRowNegLogRatio": rows.ROW_NEG_LOG_RATIO, "kRowLowerClipped": rows.ROW_LOWER_CLIPPED,
        "kPolicyRowStats": len(rows.POLICY_ROW_STATS), "kValueRowStats": len(rows.VALUE_ROW_STATS),
        **{f"kSurrogate{name.capitalize()}": code for name, code in constants.SURROGATE_CODES.items()},
        **{"kRatio" + "".join(w.capitalize() for w in name.split("-")): code
           for name, code in constants.RATIO_LEVEL_CODES.items()},
        "kKlK1": constants.KL_K1, "kKlAbs": constants.KL_ABS, "kKlK2": constants.KL_K2, "kKlK3": constants.KL_K3,
        "kKlK3Raw": constants.KL_K3_RAW,
    }
    assert header == expected


def test_row_stat_columns_are_named_once():
    names = rows.POLICY_ROW_STATS
    assert [names.index(n) for n in ("loss", "tokens", "clipped", "neg_log_ratio", "lower_clipped")] == [
        rows.ROW_LOSS, rows.ROW_TOKENS, rows.ROW_CLIPPED, rows.ROW_NEG_LOG_RATIO, rows.ROW_LOWER_CLIPPED]
    assert rows.VALUE_ROW_STATS == names[:3]
