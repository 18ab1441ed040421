"""Advantages: GAE over [B, T] tokens in one launch, and group-relative advantages.

GAE runs backwards over t (spec: ppo_fast.reference.gae). Both of its recurrences are linear,

    next_v_t = (1 - m_{t+1}) next_v_{t+1} + m_{t+1} v_{t+1}              (value after t)
    A_t      = (1 - m_t + m_t g l) A_{t+1} + m_t (r_t + g next_v_t - v_t)

so each is a scan of the affine maps s -> a s + b, composed by (a1, b1) then (a2, b2) =
(a1 a2, a2 b1 + b2). A program per row scans blocks of T from the end, carrying the state
across blocks: O(log BLOCK) depth per block, fp32, no error growth beyond the sequential loop.
"""
from __future__ import annotations

import torch

from ppo_fast import reference
from ppo_fast._checks import (
    require_choice,
    require_float,
    require_mask,
    require_nonnegative,
    require_per_token,
    require_same_device,
)
from ppo_fast._triton import tl, triton
from ppo_fast.backend import native_module, resolve_backend
from ppo_fast.ops.masked import _block_t

GROUP_MODES = reference.GROUP_MODES


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _compose_affine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _last_of_block(x, idx, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where(idx == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, adv_ptr, returns_ptr, T, gamma, gamma_lam,
                BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    next_v_carry = tl.zeros([], tl.float32)
    adv_carry = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        idx = tl.arange(0, BLOCK_T)
        t = T - 1 - (start + idx)  # this block, from the end backwards
        ok = t >= 0
        has_next = ok & (t + 1 < T)
        r = tl.load(rewards_ptr + base + t, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + base + t, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + base + t, mask=ok, other=0).to(tl.float32)
        v_next = tl.load(values_ptr + base + t + 1, mask=has_next, other=0.0).to(tl.float32)
        m_next = tl.load(mask_ptr + base + t + 1, mask=has_next, other=0).to(tl.float32)

        a, b = tl.associative_scan((1.0 - m_next, m_next * v_next), 0, _compose_affine)
        next_v = a * next_v_carry + b
        delta = r + gamma * next_v - v
        a, b = tl.associative_scan((1.0 - m + m * gamma_lam, m * delta), 0, _compose_affine)
        adv = a * adv_carry + b

        tl.store(adv_ptr + base + t, adv, mask=ok)
        tl.store(returns_ptr + base + t, adv + v, mask=ok)
        # Padding lanes (t < 0) are identity maps, so the last lane holds the block's result.
        next_v_carry = _last_of_block(next_v, idx, BLOCK_T)
        adv_carry = _last_of_block(adv, idx, BLOCK_T)


# ----------------------------------------------------------------------------- launcher
def _gae_triton(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    advantages = torch.empty(B, T, device=rewards.device, dtype=torch.float32)
    returns = torch.empty_like(advantages)
    if B * T:
        _gae_kernel[(B,)](rewards, values, mask, advantages, returns, T, gamma, gamma * lam,
                          BLOCK_T=_block_t(T), num_warps=4)
    return advantages, returns


# ----------------------------------------------------------------------------- public
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """(advantages, returns), float32 [B, T], no gradient. Masked positions inside a response
    are skipped, carrying the next value and the running advantage across them."""
    shape = require_per_token({"rewards": rewards, "values": values})
    require_mask("mask", mask, shape)
    require_same_device(rewards=rewards, mask=mask)
    gamma = require_nonnegative("gamma", gamma)
    lam = require_nonnegative("lam", lam)
    backend = resolve_backend(rewards.device, "gae", supported=("triton", "cuda", "cpp", "torch"))
    if backend == "torch":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if backend in ("cpp", "cuda"):
        inputs = (t.detach().float().contiguous() for t in (rewards, values, mask))
        return tuple(native_module("_C" if backend == "cpp" else "_C_cuda").gae_forward(*inputs, gamma, lam))
    return _gae_triton(rewards.detach().contiguous(), values.detach().contiguous(), mask.contiguous(), gamma, lam)


def group_advantages(scores, group_size, *, mode="grpo"):
    """Per-sequence advantages [B] from groups of `group_size` consecutive samples of a prompt
    (critic-free variants): grpo, rloo or none. A handful of numbers per prompt: it runs as
    plain torch on every backend."""
    require_float("scores", scores)
    require_choice("mode", mode, GROUP_MODES)
    if scores.dim() != 1:
        raise ValueError(f"scores: expected shape [B], got {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch of {scores.shape[0]} scores")
    return reference.group_advantages(scores, group_size, mode=mode)
