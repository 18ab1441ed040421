"""Benchmark cases, one function per op family (named as in ppo_fast/ops/): each case is one
public function, mode ("fwd" or "fwd+bwd"), dtype and shape, with every implementation that
can run here: `torch` (the reference, the baseline), `torch-compile` (the reference under
torch.compile: every case on GPU, the per-token cases on CPU; one compiled object per case, and
dynamo reset before each case (ops.run), so no case runs past its recompile limit), peers where installed, `ppo_fast-<backend>` for
each ppo_fast backend of the op, and `ppo_fast-compile` (the public op under torch.compile,
wherever `torch-compile` is).

A preset picks the shapes (SHAPES, per device type): `full` (default), `quick` (a small subset,
under a minute) and `headline`, the figures of the GPU run (scripts/gpu_run.py): a few cases at
the sizes the anchors report, torch.compile only where the goals compare with it. On the CPU
the headline preset is that run's dry run: the same cases at tiny sizes, torch.compile on
dynamo's `eager` backend (traced, no code generation), no fresh-process memory measurements.
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


PRESETS = ("full", "quick", "headline")
# op family -> device type -> preset -> shapes: (N, V) for logprobs, (N, H, V) for fused_linear,
# (B, T, H, V) for fused_linear_ppo_loss, (B, T) for the per-token functions (by function name).
_TOKENS_CUDA = {"full": [(64, 1024), (512, 4096)], "quick": [(64, 1024)]}
_TOKENS_CPU = {"full": [(64, 2048)], "quick": [(16, 512)]}
SHAPES = {
    "logprobs": {
        "cuda": {"full": [(4096, 128256), (8192, 128256), (16384, 128256), (32768, 128256), (8192, 152064)],
                 "quick": [(4096, 32000)], "headline": [(4096, 128256), (8192, 151936)]},
        "cpu": {"full": [(2048, 32000)], "quick": [(512, 32000)], "headline": [(16, 1013)]},
    },
    "fused_linear": {
        "cuda": {"full": [(4096, 4096, 128256), (8192, 4096, 128256), (16384, 4096, 128256), (8192, 3584, 152064)],
                 "quick": [(2048, 4096, 128256)]},
        "cpu": {"full": [(2048, 256, 32000)], "quick": [(512, 256, 32000)]},
    },
    "fused_linear_ppo_loss": {
        "cuda": {"full": [(8, 1024, 4096, 128256), (16, 1024, 4096, 128256)], "quick": [(4, 512, 4096, 128256)],
                 "headline": [(8, 1024, 4096, 128256)]},
        "cpu": {"full": [(8, 256, 256, 32000)], "quick": [(4, 128, 256, 32000)], "headline": [(2, 8, 16, 1013)]},
    },
    **{fn: {"cuda": _TOKENS_CUDA, "cpu": _TOKENS_CPU}
       for fn in ("value_loss", "kl_penalty", "compute_rewards", "agg_loss", "masked_mean", "masked_whiten")},
    "ppo_policy_loss": {"cuda": {**_TOKENS_CUDA, "headline": [(64, 4096)]},
                        "cpu": {**_TOKENS_CPU, "headline": [(4, 40)]}},
    "gae": {"cuda": {**_TOKENS_CUDA, "headline": [(512, 2048)]}, "cpu": {**_TOKENS_CPU, "headline": [(4, 40)]}},
}


def shapes(key: str, device: torch.device, preset: str) -> list:
    """The shapes of `key` (an op family, or a per-token function) for this device and preset;
    none where the preset leaves it out."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    return SHAPES[key]["cuda" if device.type == "cuda" else "cpu"].get(preset, [])


def headline_dry_run(device: torch.device, preset: str) -> bool:
    return preset == "headline" and device.type != "cuda"


def compiled(fn, device: torch.device, preset: str):
    """torch.compile(fn) for one case (see the module docstring for the headline dry run)."""
    return torch.compile(fn, dynamic=False, **({"backend": "eager"} if headline_dry_run(device, preset) else {}))


# ----------------------------------------------------------------------------- implementations
def implementations(device: torch.device, fn: str, *, compile_reference: bool, preset: str = "full") -> dict:
    """{impl name: function with the op's signature} for every implementation that can run here.
    The headline preset has no `ppo_fast-compile` rows (its goals compare eager ops)."""
    reference_fn = getattr(reference, fn)
    impls = {"torch": reference_fn}
    if compile_reference:
        impls["torch-compile"] = compiled(reference_fn, device, preset)
    for name in available_backends(device):
        if name != "torch" and name in ops.IMPLEMENTATIONS[fn]:
            impls[f"ppo_fast-{name}"] = _on_backend(name, getattr(ops, fn))
    if compile_reference and preset != "headline":  # custom ops: the compiler keeps them, fuses what is around
        impls["ppo_fast-compile"] = compiled(getattr(ops, fn), device, preset)
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
    """Peers' fused LM heads, where installed: Liger-Kernel's fused linear cross-entropy (per-token,
    no entropy) and TRL's ChunkedLogProbFunction (log-probs and entropy, the tile TRL's trainers use)."""
    peers = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        peers["liger"] = lambda hidden, weight, labels, return_entropy=True: (
            -liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="none"), None)
    except ImportError:
        pass
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as tile  # what TRL's trainers pass

        peers["trl-chunked"] = lambda hidden, weight, labels, return_entropy=True: ChunkedLogProbFunction.apply(
            hidden, weight, None, labels, 1.0, tile, None, 1.0, ("entropy",))[:2]
    except ImportError:
        pass
    return peers


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
def logprobs(device: torch.device, preset: str) -> list:
    """logprobs_from_logits with entropy; Llama-3-8B (V = 128256) and Qwen2.5-7B (V = 152064) heads on
    GPU in bf16; on CPU fp32, and bf16 too in the full preset. The headline preset compiles the
    reference at its first shape only."""
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32] + (
        [torch.bfloat16] if preset == "full" else [])
    cases = []
    for i, (n, v, dtype) in enumerate((n, v, dtype) for dtype in dtypes for n, v in shapes("logprobs", device, preset)):
        compile_reference = (device.type == "cuda" or headline_dry_run(device, preset)) and (
            preset != "headline" or i == 0)
        def make_inputs(n=n, v=v, dtype=dtype, grad=False):
            up = torch.randn(2, n, device=device)
            return {"logits": torch.randn(n, v, device=device, dtype=dtype, requires_grad=grad),
                    "labels": torch.randint(0, v, (n,), device=device), "up_logp": up[0], "up_entropy": up[1]}

        logits_bytes = n * v * dtype.itemsize
        for mode, runner, make, moved in (("fwd", _logprobs_fwd, make_inputs, logits_bytes),
                                          ("fwd+bwd", _logprobs_fwd_bwd, lambda m=make_inputs: m(grad=True),
                                           3 * logits_bytes)):  # fwd+bwd: read, read, write the gradient
            impls = {**implementations(device, "logprobs_from_logits", compile_reference=compile_reference,
                                       preset=preset), **cross_entropy_peers(device)}
            cases.append(Case("logprobs", "logprobs_from_logits", mode, dtype, {"N": n, "V": v}, make,
                              {k: runner(f) for k, f in impls.items()}, moved))
    return cases


def fused_linear(device: torch.device, preset: str) -> list:
    """fused_linear_logprobs: hidden states + LM head -> log-probs and entropy; TFLOP/s count the
    2NHV of the forward GEMM and 6NHV for fwd+bwd (ppo_fast's recompute GEMM is not credited)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = []
    for n, h, v in shapes("fused_linear", device, preset):
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


PPO_LOSS_ARGS = dict(kl_coef=0.04, kl_estimator="k3", agg="token-mean")  # the objective: clip at its defaults (0.2)


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


def _fused_loss_inputs(device, dtype, B, T, h, v):
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(v, h, device=device, generator=g) / h**0.5
    old = torch.randn(B, T, device=device, generator=g) * 0.3 - math.log(v)  # near the uniform policy
    return {"hidden": torch.randn(B, T, h, device=device, dtype=dtype, generator=g).requires_grad_(),
            "weight": weight.to(dtype).requires_grad_(), "labels": torch.randint(0, v, (B, T), device=device),
            "old": old, "ref": old + 0.1 * torch.randn(B, T, device=device, generator=g),
            "adv": torch.randn(B, 1, device=device, generator=g).expand(B, T).contiguous(),
            "mask": torch.rand(B, T, device=device, generator=g) < 0.9,
            "is": torch.rand(B, T, device=device, generator=g) + 0.5}


def _fused_loss_runner(fn, objective=None):
    objective = objective or {}
    extra = {k: v for k, v in objective.items() if k != "is_weights"}

    def run(x):
        weights = {"is_weights": x["is"]} if "is_weights" in objective else {}
        loss, _ = fn(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"], ref_log_prob=x["ref"],
                     **{**PPO_LOSS_ARGS, **weights, **extra})
        torch.autograd.grad(loss, (x["hidden"], x["weight"]))

    return run


def fused_linear_ppo_loss(device: torch.device, preset: str) -> list:
    """fused_linear_ppo_loss fwd+bwd (clipped surrogate + k3 KL, token-mean) against plain torch
    (matmul -> log_softmax -> gather -> loss), ppo_fast's two-op path and Liger's fused GRPO loss;
    TFLOP/s count the three GEMMs a backward needs (6 N H V)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_reference = device.type == "cuda" or headline_dry_run(device, preset)
    cases = []
    for B, T, h, v in shapes("fused_linear_ppo_loss", device, preset):
        n = B * T
        impls = {**implementations(device, "fused_linear_ppo_loss", compile_reference=compile_reference, preset=preset),
                 "ppo_fast-two-op": two_op_path, **fused_ppo_loss_peers(device)}
        cases.append(Case("fused_linear_ppo_loss", "fused_linear_ppo_loss", "fwd+bwd", dtype,
                          {"B": B, "T": T, "H": h, "V": v},
                          lambda B=B, T=T, h=h, v=v: _fused_loss_inputs(device, dtype, B, T, h, v),
                          {k: _fused_loss_runner(f) for k, f in impls.items()},
                          2 * (n * h + v * h) * dtype.itemsize, flops=6 * n * h * v,
                          cpu_memory=not headline_dry_run(device, preset)))
    return cases


def _token_inputs(device, B, T, grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    old = torch.randn(B, T, device=device, generator=g) * 0.5 - 2
    mask = torch.rand(B, T, device=device, generator=g) < 0.9
    return {
        "x": (old + 0.3 * torch.randn(B, T, device=device, generator=g)).requires_grad_(grad),
        "old": old, "other": torch.randn(B, T, device=device, generator=g), "mask": mask,
        "scores": torch.randn(B, device=device, generator=g), "is": torch.rand(B, T, device=device, generator=g) + 0.5,
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
    "agg_loss": ("masked", lambda f, x: f(x["x"], x["mask"], "seq-mean-token-mean"), 5, 9),
    "masked_mean": ("masked", lambda f, x: f(x["x"], x["mask"]), 5, 9),
    "masked_whiten": ("masked", lambda f, x: f(x["x"], x["mask"]), 9, None),
}


def token_cases(op: str, device: torch.device, preset: str) -> list:
    """Cases of every per-token function of the op family `op` ([B, T] shapes: RLHF batch sizes on
    GPU, scaled down on CPU). The headline preset times what its goals name: fwd+bwd of the
    policy loss, the forward of GAE."""
    cases = []
    for fn, (family, call, bytes_fwd, bytes_fwd_bwd) in TOKEN_FUNCTIONS.items():
        if family != op:
            continue
        compile_reference = fn != "gae"  # the loop would unroll T steps
        for B, T in shapes(fn, device, preset):
            modes = [("fwd", _no_grad, False, bytes_fwd)] + (
                [("fwd+bwd", _with_grad, True, bytes_fwd_bwd)] if bytes_fwd_bwd else [])
            if preset == "headline" and bytes_fwd_bwd:
                modes = modes[1:]
            for mode, runner, grad, per_token in modes:
                impls = implementations(device, fn, compile_reference=compile_reference, preset=preset)
                cases.append(Case(op, fn, mode, torch.float32, {"B": B, "T": T},
                                  lambda B=B, T=T, grad=grad: _token_inputs(device, B, T, grad=grad),
                                  {k: runner(call, f) for k, f in impls.items()}, per_token * B * T))
    return cases


# The policy objectives users switch on beside vanilla PPO (ppo_fast.ops.objectives): name -> their
# keyword arguments ("is_weights" asks for per-token importance weights).
OBJECTIVES = {
    "ppo": {}, "ppo+is": {"is_weights": "token"}, "gspo": {"ratio_level": "sequence"},
    "gspo-token": {"ratio_level": "sequence-token"}, "cispo": {"objective": "cispo", "clip_low": 1.0, "clip_high": 4.0},
    "gpg": {"objective": "gpg"}, "sapo": {"objective": "sapo"},
    "dro (generic)": {"objective": "dro", "beta": 0.1},  # the registry's generic path: autograd on [B, T]
}


def _policy_objective_call(objective):
    extra = {k: v for k, v in objective.items() if k != "is_weights"}
    return lambda f, x: f(x["x"], x["old"], x["other"], x["mask"], **extra,
                          **({"is_weights": x["is"]} if "is_weights" in objective else {}))[0]


def objectives(device: torch.device, preset: str) -> list:
    """ppo_policy_loss and fused_linear_ppo_loss fwd+bwd with each objective of OBJECTIVES, at the
    shapes of the policy-loss and fused-loss cases, so each mode's cost beside vanilla PPO is a row
    (the objective is named in the shape). torch.compile of the reference for the per-token op
    (not in the headline preset); the fused op against plain torch."""
    cases = []
    fused_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, objective in OBJECTIVES.items():
        weights = 4 if "is_weights" in objective else 0  # bytes per token of the weights
        for B, T in shapes("ppo_policy_loss", device, preset):
            impls = implementations(device, "ppo_policy_loss", compile_reference=preset != "headline", preset=preset)
            call = _policy_objective_call(objective)
            cases.append(Case("objectives", "ppo_policy_loss", "fwd+bwd", torch.float32,
                              {"B": B, "T": T, "objective": name},
                              lambda B=B, T=T: _token_inputs(device, B, T, grad=True),
                              {k: _with_grad(call, f) for k, f in impls.items()}, (17 + weights) * B * T))
        for B, T, h, v in shapes("fused_linear_ppo_loss", device, preset):
            n = B * T
            impls = implementations(device, "fused_linear_ppo_loss", compile_reference=False, preset=preset)
            cases.append(Case("objectives", "fused_linear_ppo_loss", "fwd+bwd", fused_dtype,
                              {"B": B, "T": T, "H": h, "V": v, "objective": name},
                              lambda B=B, T=T, h=h, v=v: _fused_loss_inputs(device, fused_dtype, B, T, h, v),
                              {k: _fused_loss_runner(f, objective) for k, f in impls.items()},
                              2 * (n * h + v * h) * fused_dtype.itemsize, flops=6 * n * h * v))
    return cases


CASES = {"logprobs": logprobs, "fused_linear": fused_linear, "fused_linear_ppo_loss": fused_linear_ppo_loss,
         "objectives": objectives}
CASES.update({op: (lambda device, preset, op=op: token_cases(op, device, preset))
              for op in dict.fromkeys(family for family, *_ in TOKEN_FUNCTIONS.values())})
