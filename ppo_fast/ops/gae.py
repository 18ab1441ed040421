"""GAE over [B, T] tokens: advantages and returns in one launch.

GAE runs backwards over t (spec: ppo_fast.reference.gae). Both of its recurrences are linear,

    next_v_t = (1 - m_{t+1}) next_v_{t+1} + m_{t+1} v_{t+1}              (value after t)
    A_t      = (1 - m_t + m_t g l) A_{t+1} + m_t (r_t + g next_v_t - v_t)

so each is a scan of the affine maps s -> a s + b, composed by (a1, b1) then (a2, b2) =
(a1 a2, a2 b1 + b2). A program per row scans blocks of T from the end, carrying the state
across blocks: O(log BLOCK) depth per block, fp32, no error growth beyond the sequential loop.
Rewards and values at masked positions are read as 0 (the reference's rule).
"""
from __future__ import annotations

import torch

from ppo_fast.ops import reference
from ppo_fast.ops.backend import backend_table, dispatch, plain_eager
from ppo_fast.ops.native import native_module
from ppo_fast.ops.checks import native_rows, per_token_inputs, require_nonnegative
from ppo_fast.ops.triton_helpers import block_t, tl, triton


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
        m = tl.load(mask_ptr + base + t, mask=ok, other=0).to(tl.float32)
        r = tl.load(rewards_ptr + base + t, mask=m != 0, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + base + t, mask=m != 0, other=0.0).to(tl.float32)
        m_next = tl.load(mask_ptr + base + t + 1, mask=has_next, other=0).to(tl.float32)
        v_next = tl.load(values_ptr + base + t + 1, mask=m_next != 0, other=0.0).to(tl.float32)

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


# ----------------------------------------------------------------------------- launchers
def _gae_triton(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    advantages = torch.empty(B, T, device=rewards.device, dtype=torch.float32)
    returns = torch.empty_like(advantages)
    if B * T:
        _gae_kernel[(B,)](rewards, values, mask, advantages, returns, T, gamma, gamma * lam,
                          BLOCK_T=block_t(T), num_warps=4)
    return advantages, returns


def _gae_native(module):
    def run(rewards, values, mask, gamma, lam):
        inputs = native_rows(rewards, values, mask=mask)
        return tuple(native_module(module).gae_forward(*inputs, gamma, lam))

    return run


# ----------------------------------------------------------------------------- custom op
KERNELS = {"triton": _gae_triton, "cuda": _gae_native("_C_cuda"), "cpp": _gae_native("_C")}


@torch.library.custom_op("ppo_fast::gae", mutates_args=())
def gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend](rewards, values, mask, gamma, lam)


@gae_op.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    return (rewards.new_empty(rewards.shape, dtype=torch.float32),
            rewards.new_empty(rewards.shape, dtype=torch.float32))


# ----------------------------------------------------------------------------- public
def _gae_on_kernels(rewards, values, mask, *, gamma, lam, backend):
    if plain_eager(rewards):  # no autograd to register: the kernel itself, without the op's dispatch
        return KERNELS[backend](rewards, values, mask, gamma, lam)
    return gae_op(rewards, values, mask, gamma, lam, backend)


# {backend: implementation with the public signature}; dispatch calls these.
GAE = backend_table(_gae_on_kernels, KERNELS, reference.gae)
IMPLEMENTATIONS = {"gae": GAE}


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """(advantages, returns), float32 [B, T], no gradient. Masked positions inside a response
    are skipped, carrying the next value and the running advantage across them."""
    rewards, values, mask = per_token_inputs({"rewards": rewards, "values": values}, mask)
    gamma = require_nonnegative("gamma", gamma)
    lam = require_nonnegative("lam", lam)
    return dispatch("gae", GAE, rewards.device, rewards.detach(), values, mask, gamma=gamma, lam=lam)
