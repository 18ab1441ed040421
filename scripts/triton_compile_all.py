"""scripts/triton_compile_all.py: compile every Triton kernel of ppo_fast for sm_90 (PTX and
cubin) without a GPU.

    TRITON_INTERPRET=0 python3 scripts/triton_compile_all.py

Run as a script with TRITON_INTERPRET=0 (tests/ops/test_triton_compile.py does): the interpreter
accepts code that the compiler rejects (a non-constexpr global, a load of a None pointer in a
branch that is not static), so this is the check that the kernels build for a real device.
Prints one line per variant and exits 1 if any failed.
"""
import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Modules by name: ppo_fast.ops re-exports functions that share some module names (value_loss).
gae, kl, logprobs, masked, policy_loss, value_loss = (
    importlib.import_module(f"ppo_fast.ops.{name}")
    for name in ("gae", "kl", "logprobs", "masked", "policy_loss", "value_loss")
)

P32, P16, PBOOL = "*fp32", "*bf16", "*i1"


def variants():
    """(name, kernel, {arg: type or None for a None pointer}, {constexpr: value})."""
    lp_fwd = dict(logits_ptr=P16, labels_ptr="*i64", logp_ptr=P32, entropy_ptr=P32, norm_ptr=P32, stats_ptr=None,
                  V="i32", rows_per_batch="i32", stride_batch="i64", stride_row="i32", inv_temperature="fp32",
                  scale="fp32", softcap="fp32", ignore_index="i32")
    plain = dict(HAS_LABELS=True, WITH_ENTROPY=True, HAS_SOFTCAP=False, WITH_STATS=False, BLOCK_V=4096)
    yield "logprobs fwd", logprobs._logprobs_fwd_kernel, lp_fwd, plain
    yield ("logprobs fwd softcap + stats", logprobs._logprobs_fwd_kernel, {**lp_fwd, "stats_ptr": P32},
           {**plain, "HAS_SOFTCAP": True, "WITH_STATS": True})
    yield ("entropy fwd", logprobs._logprobs_fwd_kernel, {**lp_fwd, "labels_ptr": None, "logp_ptr": None},
           {**plain, "HAS_LABELS": False, "BLOCK_V": 1024})
    lp_bwd = dict(logits_ptr=P16, grad_logits_ptr=P16, labels_ptr="*i64", grad_logp_ptr=P32, grad_entropy_ptr=P32,
                  norm_ptr=P32, entropy_ptr=P32, V="i32", rows_per_batch="i32", stride_batch="i64", stride_row="i32",
                  inv_temperature="fp32", scale="fp32", softcap="fp32", ignore_index="i32")
    for softcap in (False, True):
        yield (f"logprobs bwd softcap={softcap}", logprobs._logprobs_bwd_kernel, lp_bwd,
               dict(HAS_GRAD_LOGP=True, HAS_GRAD_ENTROPY=True, HAS_SOFTCAP=softcap, BLOCK_V=4096))
    yield ("logprobs bwd (logp only)", logprobs._logprobs_bwd_kernel,
           {**lp_bwd, "grad_entropy_ptr": None, "entropy_ptr": None},
           dict(HAS_GRAD_LOGP=True, HAS_GRAD_ENTROPY=False, HAS_SOFTCAP=False, BLOCK_V=4096))
    for centered in (False, True):
        yield (f"masked row sums centered={centered}", masked._masked_row_sums_kernel,
               dict(x_ptr=P32, mask_ptr=PBOOL, center_ptr=P32 if centered else None, out_ptr=P32, T="i32"),
               dict(CENTERED=centered, BLOCK_T=1024))
    yield ("whiten", masked._whiten_kernel, dict(x_ptr=P32, stats_ptr=P32, out_ptr=P32, numel="i32"),
           dict(SHIFT_MEAN=False, BLOCK=1024))
    policy = dict(log_prob_ptr=P32, old_ptr=P32, adv_ptr=P32, mask_ptr=PBOOL, is_ptr=P32, dloss_ptr=P32,
                  row_stats_ptr=P32, T="i32", is_stride_row="i32", is_stride_t="i32", clip_low="fp32",
                  clip_high="fp32", dual_clip="fp32", tau_pos="fp32", tau_neg="fp32")
    for dual, grad in ((True, True), (False, False)):
        yield (f"policy loss clip dual={dual} grad={grad}", policy_loss._policy_loss_fwd_kernel,
               {**policy, "is_ptr": None, "dloss_ptr": P32 if grad else None},
               dict(SURROGATE=0, RATIO_LEVEL=0, HAS_IS=False, HAS_DUAL_CLIP=dual, NEEDS_GRAD=grad, BLOCK_T=1024))
    for surrogate, name in enumerate(("clip", "cispo", "gpg", "sapo")):
        for level in ((0,) if name == "gpg" else (0, 1, 2)):
            yield (f"policy loss {name} level={level} with is_weights", policy_loss._policy_loss_fwd_kernel, policy,
                   dict(SURROGATE=surrogate, RATIO_LEVEL=level, HAS_IS=True, HAS_DUAL_CLIP=False, NEEDS_GRAD=True,
                        BLOCK_T=1024))
    yield ("value loss", value_loss._value_loss_fwd_kernel,
           dict(values_ptr=P32, old_ptr=P32, returns_ptr=P32, mask_ptr=P32, dloss_ptr=P32, row_stats_ptr=P32, T="i32",
                clip="fp32"), dict(NEEDS_GRAD=True, BLOCK_T=1024))
    for code in range(5):
        yield (f"kl fwd estimator={code}", kl._kl_fwd_kernel,
               dict(log_prob_ptr=P32, ref_ptr=P32, out_ptr=P32, numel="i32"),
               dict(ESTIMATOR=code, STRAIGHT=code == 3, BLOCK=1024))
        yield (f"kl bwd estimator={code}", kl._kl_bwd_kernel,
               dict(log_prob_ptr=P32, ref_ptr=P32, upstream_ptr=P32, grad_log_prob_ptr=P32, grad_ref_ptr=None,
                    numel="i32"), dict(ESTIMATOR=code, WANT_LOG_PROB=True, WANT_REF=False, BLOCK=1024))
    yield ("rewards", kl._rewards_kernel,
           dict(scores_ptr=P32, log_prob_ptr=P32, ref_ptr=P32, mask_ptr=PBOOL, out_ptr=P32, T="i32", kl_coef="fp32"),
           dict(ESTIMATOR=3, STRAIGHT=False, BLOCK_T=1024))
    yield ("gae", gae._gae_kernel,
           dict(rewards_ptr=P32, values_ptr=P32, mask_ptr=PBOOL, adv_ptr=P32, returns_ptr=P32, T="i32",
                gamma="fp32", gamma_lam="fp32"), dict(BLOCK_T=1024))


def compile_variant(kernel, args, constexprs):
    signature = {name: ("constexpr" if kind is None else kind) for name, kind in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    values = {**{name: None for name, kind in args.items() if kind is None}, **constexprs}
    options = logprobs.COMPILE_OPTIONS if kernel in (logprobs._logprobs_fwd_kernel, logprobs._logprobs_bwd_kernel) else {}
    triton.compile(ASTSource(kernel, signature, constexprs=values), target=GPUTarget("cuda", 90, 32), options=options)


def main() -> int:
    failed = 0
    for name, kernel, args, constexprs in variants():
        try:
            compile_variant(kernel, args, constexprs)
            print(f"ok   {name}")
        except Exception as err:  # report every failing kernel, not just the first
            failed += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
