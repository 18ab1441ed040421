"""Benchmark cases, one function per op family (named as in ppo_fast/ops/): each case is one
public function, mode ("fwd" or "fwd+bwd"), dtype and shape, with every implementation that
can run here: `torch` (the reference, the baseline), `torch-compile` (the reference under
torch.compile: every case on GPU, the per-token cases on CPU; one compiled object per case, so
no case runs past dynamo's recompile limit), peers where installed, `ppo_fast-<backend>` for
each ppo_fast backend of the op, and `ppo_fast-compile` (the public op under torch.compile,
wherever `torch-compile` is).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import ppo_fast
from ppo_fast import ops
from ppo_fast.ops import reference
from ppo_fast.ops.backend import available_backends


@dataclasses.dataclass
class Case:
    """`make_inputs()` builds fresh inputs; each impl maps inputs -> None (it runs the op once)."""

    op: str  # the op family (ppo_fast/ops/<op>.py)
    fn: str  # the public function timed
    mode: str
    dtype: torch.dtype
    shape: dict
    make_inputs: Callable[[], dict]
    impls: dict
    bytes_moved: int  # bytes the op must read and write
    flops: int = 0
    cpu_memory: bool = False  # also measure peak memory on the CPU (a fresh process per implementation)


# ----------------------------------------------------------------------------- implementations
def implementations(device: torch.device, fn: str, *, compile_reference: bool) -> dict:
    """{impl name: function with the op's signature} for every implementation that can run here."""
    reference_fn = getattr(reference, fn)
    impls = {"torch": reference_fn}
    if compile_reference:
        impls["torch-compile"] = torch.compile(reference_fn, dynamic=False)
    for name in available_backends(device):
        if name != "torch" and name in ops.IMPLEMENTATIONS[fn]:
            impls[f"ppo_fast-{name}"] = _on_backend(name, getattr(ops, fn))
    if compile_reference:  # ppo_fast's ops are custom ops: the compiler keeps them and fuses what is around
        impls["ppo_fast-compile"] = torch.compile(getattr(ops, fn), dynamic=False)
    return impls


def _on_backend(name, fn):
    def run(*args, **kwargs):
        with ppo_fast.use_backend(name):
            return fn(*args, **kwargs)

    return run


def cross_entropy_peers(device: torch.device) -> dict:
    """Per-token cross-entropy kernels of peers, where installed: logp = -loss, no entropy."""
    peers = {}
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        peers["liger"] = lambda logits, labels, return_entropy=True: (
            -liger_cross_entropy(logits, labels, reduction="none"), None)
    except ImportError:
        pass
    if device.type == "cuda":
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            peers["flash-attn"] = lambda logits, labels, return_entropy=True: (
                -cross_entropy_loss(logits, labels)[0], None)
        except ImportError:
            pass
    return peers


def fused_linear_peers() -> dict:
    """Liger-Kernel's fused linear cross-entropy (per-token, no entropy), where installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return {}
    return {"liger": lambda hidden, weight, labels, return_entropy=True: (
        -liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="none"), None)}


# ----------------------------------------------------------------------------- runners
def _logprob_runners(call, grad_keys):
    """(fwd, fwd+bwd) runner factories for an op whose `call(fn, x)` returns (logp, entropy);
    the backward takes the case's random upstream gradients to the inputs named by grad_keys."""
    def fwd_bwd(fn):
        def run(x):
            logp, entropy = call(fn, x)
            outputs, upstream = ((logp,), (x["up_logp"],)) if entropy is None else (
                (logp, entropy), (x["up_logp"], x["up_entropy"]))
            torch.autograd.grad(outputs, tuple(x[k] for k in grad_keys), upstream)

        return run

    return (lambda fn: _no_grad(call, fn)), fwd_bwd


def _no_grad(call, fn):
    def run(x):
        with torch.no_grad():
            call(fn, x)

    return run


def _with_grad(call, fn):
    def run(x):
        out = call(fn, x)
        torch.autograd.grad(out, x["x"], torch.ones_like(out))

    return run


_logprobs_fwd, _logprobs_fwd_bwd = _logprob_runners(
    lambda fn, x: fn(x["logits"], x["labels"], return_entropy=True), ("logits",))
_fused_linear_fwd, _fused_linear_fwd_bwd = _logprob_runners(
    lambda fn, x: fn(x["hidden"], x["weight"], x["labels"], return_entropy=True), ("hidden", "weight"))


# ----------------------------------------------------------------------------- cases by op family
def logprobs(device: torch.device, quick: bool) -> list:
    """logprobs_from_logits with entropy; Llama-3-8B (V = 128256) and Qwen2.5-7B (V = 152064) heads on GPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(4096, 32000)] if quick else [(4096, 128256), (8192, 128256), (16384, 128256), (32768, 128256),
                                                (8192, 152064)]
    else:
        dtype = torch.float32
        shapes = [(512, 32000)] if quick else [(2048, 32000)]
    cases = []
    for n, v in shapes:
        def make_inputs(n=n, v=v, grad=False):
            up = torch.randn(2, n, device=device)
            return {"logits": torch.randn(n, v, device=device, dtype=dtype, requires_grad=grad),
                    "labels": torch.randint(0, v, (n,), device=device), "up_logp": up[0], "up_entropy": up[1]}

        logits_bytes = n * v * dtype.itemsize
        for mode, runner, make, moved in (("fwd", _logprobs_fwd, make_inputs, logits_bytes),
                                          ("fwd+bwd", _logprobs_fwd_bwd, lambda m=make_inputs: m(grad=True),
                                           3 * logits_bytes)):  # fwd+bwd: read, read, write the gradient
            impls = {**implementations(device, "logprobs_from_logits", compile_reference=device.type == "cuda"),
                     **cross_entropy_peers(device)}
            cases.append(Case("logprobs", "logprobs_from_logits", mode, dtype, {"N": n, "V": v}, make,
                              {k: runner(f) for k, f in impls.items()}, moved))
    return cases


def fused_linear(device: torch.device, quick: bool) -> list:
    """fused_linear_logprobs: hidden states + LM head -> log-probs and entropy; TFLOP/s count the
    2NHV of the forward GEMM and 6NHV for fwd+bwd (ppo_fast's recompute GEMM is not credited)."""
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(2048, 4096, 128256)] if quick else [(4096, 4096, 128256), (8192, 4096, 128256),
                                                       (16384, 4096, 128256), (8192, 3584, 152064)]
    else:
        dtype = torch.float32
        shapes = [(512, 256, 32000)] if quick else [(2048, 256, 32000)]
    cases = []
    for n, h, v in shapes:
        def make_inputs(n=n, h=h, v=v, grad=False):
            up = torch.randn(2, n, device=device)
            return {"hidden": torch.randn(n, h, device=device, dtype=dtype, requires_grad=grad),
                    "weight": (torch.randn(v, h, device=device, dtype=dtype) / h**0.5).requires_grad_(grad),
                    "labels": torch.randint(0, v, (n,), device=device), "up_logp": up[0], "up_entropy": up[1]}

        io_bytes = (n * h + v * h) * dtype.itemsize
        shape = {"N": n, "H": h, "V": v}
        for mode, runner, make, moved, flops in (
                ("fwd", _fused_linear_fwd, make_inputs, io_bytes, 2 * n * h * v),
                ("fwd+bwd", _fused_linear_fwd_bwd, lambda m=make_inputs: m(grad=True), 2 * io_bytes, 6 * n * h * v)):
            impls = {**implementations(device, "fused_linear_logprobs", compile_reference=device.type == "cuda"),
                     **fused_linear_peers()}
            cases.append(Case("fused_linear", "fused_linear_logprobs", mode, dtype, shape, make,
                              {k: runner(f) for k, f in impls.items()}, moved, flops=flops, cpu_memory=True))
    return cases


PPO_LOSS_ARGS = dict(kl_coef=0.04, kl_estimator="k3", clip_low=0.2, clip_high=0.2, agg="token-mean")


def two_op_path(hidden, weight, labels, old_log_prob, advantages, mask, *, ref_log_prob, kl_coef, kl_estimator,
                **policy_args):
    """The same objective from ppo_fast's separate ops, as a trainer composed it before the fused
    loss: fused_linear_logprobs, then ppo_policy_loss + KL (the logits are formed twice)."""
    logp = ops.fused_linear_logprobs(hidden, weight, labels)
    loss, stats = ops.ppo_policy_loss(logp, old_log_prob, advantages, mask, **policy_args)
    kl = ops.kl_penalty(logp, ref_log_prob, estimator=kl_estimator)
    return loss + kl_coef * ops.agg_loss(kl, mask, policy_args["agg"]), stats


def fused_ppo_loss_peers(device: torch.device) -> dict:
    """Liger-Kernel's fused linear GRPO loss (k3 KL with beta = kl_coef, token-mean as 'dapo';
    per-sequence advantages, so the case's advantages are constant along each row), where installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return {}
    grpo = LigerFusedLinearGRPOLoss(beta=PPO_LOSS_ARGS["kl_coef"], compiled=device.type == "cuda",
                                    epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")

    def liger(hidden, weight, labels, old_log_prob, advantages, mask, *, ref_log_prob, **_):
        return grpo(hidden, weight, labels, mask.long(), advantages[:, 0], ref_per_token_logps=ref_log_prob,
                    old_per_token_logps=old_log_prob)

    return {"liger-grpo": liger}


def fused_linear_ppo_loss(device: torch.device, quick: bool) -> list:
    """fused_linear_ppo_loss fwd+bwd (clipped surrogate + k3 KL, token-mean) against plain torch
    (matmul -> log_softmax -> gather -> loss), ppo_fast's two-op path and Liger's fused GRPO loss;
    TFLOP/s count the three GEMMs a backward needs (6 N H V)."""
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(4, 512, 4096, 128256)] if quick else [(8, 1024, 4096, 128256), (16, 1024, 4096, 128256)]
    else:
        dtype = torch.float32
        shapes = [(4, 128, 256, 32000)] if quick else [(8, 256, 256, 32000)]
    cases = []
    for B, T, h, v in shapes:
        def make_inputs(B=B, T=T, h=h, v=v):
            g = torch.Generator(device=device).manual_seed(0)
            weight = torch.randn(v, h, device=device, generator=g) / h**0.5
            old = torch.randn(B, T, device=device, generator=g) * 0.3 - math.log(v)  # near the uniform policy
            return {"hidden": torch.randn(B, T, h, device=device, dtype=dtype, generator=g).requires_grad_(),
                    "weight": weight.to(dtype).requires_grad_(), "labels": torch.randint(0, v, (B, T), device=device),
                    "old": old, "ref": old + 0.1 * torch.randn(B, T, device=device, generator=g),
                    "adv": torch.randn(B, 1, device=device, generator=g).expand(B, T).contiguous(),
                    "mask": torch.rand(B, T, device=device, generator=g) < 0.9}

        def runner(fn):
            def run(x):
                loss, _ = fn(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"],
                             ref_log_prob=x["ref"], **PPO_LOSS_ARGS)
                torch.autograd.grad(loss, (x["hidden"], x["weight"]))

            return run

        n = B * T
        impls = {**implementations(device, "fused_linear_ppo_loss", compile_reference=device.type == "cuda"),
                 "ppo_fast-two-op": two_op_path, **fused_ppo_loss_peers(device)}
        cases.append(Case("fused_linear_ppo_loss", "fused_linear_ppo_loss", "fwd+bwd", dtype,
                          {"B": B, "T": T, "H": h, "V": v}, make_inputs, {k: runner(f) for k, f in impls.items()},
                          2 * (n * h + v * h) * dtype.itemsize, flops=6 * n * h * v, cpu_memory=True))
    return cases


def token_shapes(device: torch.device, quick: bool) -> list:
    """[B, T] shapes for the per-token ops: RLHF batch sizes on GPU, scaled down on CPU."""
    if device.type == "cuda":
        return [(64, 1024)] if quick else [(64, 1024), (512, 4096)]
    return [(16, 512)] if quick else [(64, 2048)]


def _token_inputs(device, B, T, grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    old = torch.randn(B, T, device=device, generator=g) * 0.5 - 2
    mask = torch.rand(B, T, device=device, generator=g) < 0.9
    return {
        "x": (old + 0.3 * torch.randn(B, T, device=device, generator=g)).requires_grad_(grad),
        "old": old, "other": torch.randn(B, T, device=device, generator=g), "mask": mask,
        "scores": torch.randn(B, device=device, generator=g),
    }


# fn: (op family, call(fn, inputs) -> output, bytes per token fwd, fwd+bwd or None). Bytes per
# token: fp32 inputs read (4 each), a bool mask (1), outputs and gradients written (4 each).
TOKEN_FUNCTIONS = {
    "ppo_policy_loss": ("policy_loss", lambda f, x: f(x["x"], x["old"], x["other"], x["mask"], dual_clip=3.0)[0],
                        13, 17),
    "value_loss": ("value_loss", lambda f, x: f(x["x"], x["old"], x["other"], x["mask"])[0], 13, 17),
    "kl_penalty": ("kl", lambda f, x: f(x["x"], x["old"], estimator="k3"), 12, 20),
    "compute_rewards": ("kl", lambda f, x: f(x["scores"], x["x"], x["old"], x["mask"], kl_coef=0.05), 13, None),
    "gae": ("gae", lambda f, x: f(x["other"], x["old"], x["mask"], gamma=1.0, lam=0.95), 17, None),
    "masked_whiten": ("masked", lambda f, x: f(x["x"], x["mask"]), 9, None),
}


def token_cases(op: str, device: torch.device, quick: bool) -> list:
    """Cases of every per-token function of the op family `op`."""
    cases = []
    for fn, (family, call, bytes_fwd, bytes_fwd_bwd) in TOKEN_FUNCTIONS.items():
        if family != op:
            continue
        compile_reference = fn != "gae"  # the loop would unroll T steps
        for B, T in token_shapes(device, quick):
            modes = [("fwd", _no_grad, False, bytes_fwd)] + (
                [("fwd+bwd", _with_grad, True, bytes_fwd_bwd)] if bytes_fwd_bwd else [])
            for mode, runner, grad, per_token in modes:
                impls = implementations(device, fn, compile_reference=compile_reference)
                cases.append(Case(op, fn, mode, torch.float32, {"B": B, "T": T},
                                  lambda B=B, T=T, grad=grad: _token_inputs(device, B, T, grad=grad),
                                  {k: runner(call, f) for k, f in impls.items()}, per_token * B * T))
    return cases


CASES = {"logprobs": logprobs, "fused_linear": fused_linear, "fused_linear_ppo_loss": fused_linear_ppo_loss}
CASES.update({op: (lambda device, quick, op=op: token_cases(op, device, quick))
              for op in dict.fromkeys(family for family, *_ in TOKEN_FUNCTIONS.values())})
