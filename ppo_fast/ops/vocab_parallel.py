"""Vocabulary-parallel (tensor-parallel) head: log-probs, entropy and their statistics of rows whose
logits — or whose LM head — are split over a process group by vocabulary, Megatron's convention:
contiguous shards in rank order, rank r holding columns [o_r, o_r + V_r) (logits[..., V_r], or the
weight's rows [V_r, H]); labels are global ids. logprobs_from_logits, entropy_from_logits and
fused_linear_logprobs (and fused_linear_ppo_loss) take `tp_group=`, or a DTensor sharded on the
vocabulary (see from_dtensors), and come here.

Each rank runs its backend's log-probs kernel on its shard and keeps, per unit and row, the
partials of the online log-sum-exp: the max m, log d (d = sum e^(x - m)) and the entropy H of the
unit's own softmax (with return_stats, log sum p^2 and the sum of x too). One all-gather (a few
floats per row and unit, the label's x riding along) brings every unit to every rank, and every rank
combines them alike, in global order:

    M = max_u m_u,   w_u = e^(m_u - M),   D = sum_u w_u d_u,   lse = M + log D
    S = sum_u w_u d_u (log d_u - H_u + m_u - M)        (a unit's sum e (x - m) is d (log d - H))
    H = log D - S / D,   log p_y = (x_y - M) - log D

The backward is the local kernel with the global (M, log D) and H: dL/dlogits on the shard (a label
in another shard counts in -p g_logp only). The fused head sums d_hidden over the group (one
all-reduce per pass); d_weight stays local.

Units: a rank's whole shard (the default: one partial per rank), or with invariant=True fixed
global blocks of VOCAB_BLOCK columns — shards must then start on a block boundary (Megatron pads the
vocabulary to a multiple of 128 x TP) — whose partials are computed and combined identically
whatever the group's size: a row's log-prob and entropy are bitwise the same for 1, 2, 3 or 4 ranks
(the trainer and a rollout engine of another TP degree agree to the bit). The fused head then also
runs its GEMMs per block of VOCAB_BLOCK columns (their roundings cannot depend on a shard's size),
takes its chunks of rows from the whole vocabulary and a fixed budget, and sums d_hidden over the
blocks in float64: its gradients are the same at any group size too, up to float64 rounding of that
sum before it is rounded to fp32 (a PPO run at tensor_parallel 2 equals the run at 1 bitwise,
tests/ppo/test_distributed.py). The default path agrees with it to fp32 rounding. Eager autograd
(collectives inside: not for torch.compile).
"""
from __future__ import annotations

import hashlib
import math
import torch
import torch.distributed as dist

from ppo_fast.ops import reference
from ppo_fast.ops.backend import resolve_backend
from ppo_fast.ops.logprobs import KERNELS, STATS, LogitTransform, split_stats
from ppo_fast.ops.reference import blocked_linear, row_sums

VOCAB_BLOCK = 128  # columns per unit of the invariant path (shard offsets must be multiples of it)
# per-unit partial columns: max, log d, entropy, log sum p^2, sum of x, column count
M, LOG_D, H, LSSP, X_SUM, COLS = range(6)


# ----------------------------------------------------------------------------- the group
def vocab_shards(vocab: int, size: int, aligned: bool = False) -> list:
    """[(start, end)] of each rank's columns, in rank order: as even as possible (Megatron's split,
    the first V mod size ranks one column more), or with `aligned` whole blocks of VOCAB_BLOCK
    columns shared out so (the invariant mode's layout; the partial block last, empty shards at
    the end where there are fewer blocks than ranks)."""
    unit = VOCAB_BLOCK if aligned else 1
    units = -(-vocab // unit)
    counts = [units // size + (r < units % size) for r in range(size)]
    starts = [unit * sum(counts[:r]) for r in range(size + 1)]
    return [(min(starts[r], vocab), min(starts[r + 1], vocab)) for r in range(size)]


def shard_layout(local_vocab: int, group, device, check: dict, labels=None, ignore_index=-100,
                 invariant=False) -> tuple[int, int]:
    """(offset, total vocabulary) of this rank's shard, from one small all-gather of every rank's shard
    size, settings (`check`, settings_of: dtype, device, transform, mode must agree) and label range; a
    bad set-up raises the same error on every rank (no rank is left waiting in a collective)."""
    size = dist.get_world_size(group)
    code = float(int(hashlib.sha1(repr(sorted(check.items())).encode()).hexdigest()[:12], 16))  # same on every rank
    counted = labels[labels != ignore_index] if labels is not None else None
    low = float(counted.min()) if counted is not None and counted.numel() else 0.0
    high = float(counted.max()) if counted is not None and counted.numel() else 0.0
    mine = torch.tensor([float(local_vocab), code, low, high], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).cpu()
    sizes = [int(v) for v in every[:, 0].tolist()]
    if len(set(every[:, 1].tolist())) != 1:
        raise ValueError(f"tp_group: the ranks called with different settings ({sorted(check)}: dtype, device, "
                         f"hidden size, transform, mode must agree on every rank)")
    total = sum(sizes)
    if total == 0:
        raise ValueError(f"logits / weight: the shards hold no column ({sizes} by rank); a distribution needs one")
    if labels is not None and (every[:, 2].min() < 0 or every[:, 3].max() >= total):
        bad = int(every[:, 3].max()) if every[:, 3].max() >= total else int(every[:, 2].min())
        raise ValueError(f"labels: values must be in [0, {total}) (the shards' vocabulary, {sizes} by rank) or "
                         f"equal ignore_index={ignore_index}; found {bad} (a label in no shard)")
    offsets = [sum(sizes[:r]) for r in range(size)]
    unaligned = [o for o, n in zip(offsets, sizes) if n and o % VOCAB_BLOCK]  # an empty shard starts nowhere
    if invariant and unaligned:
        raise ValueError(f"tp_group: invariant=True needs every shard to start on a multiple of {VOCAB_BLOCK} "
                         f"columns; the shards start at {offsets}; pad the vocabulary as Megatron does, or use "
                         f"invariant=False")
    return offsets[dist.get_rank(group)], total


def settings_of(dtype, device, tr: LogitTransform, invariant: bool, **more) -> dict:
    """The settings every rank of the group must call with alike (shard_layout's `check`)."""
    return {"dtype": str(dtype), "device": device.type, "inv_t": tr.inv_t, "scale": tr.scale, "softcap": tr.softcap,
            "invariant": invariant, **more}


def from_dtensors(tp_group, sharded: dict, replicated: dict):
    """The DTensor entry: (tp_group, {name: local tensor}) from `sharded` {name: (tensor or None, the
    vocabulary dim)} — DTensors sharded on that dim over one mesh dimension, replicated over any
    other (the group: that mesh dimension's) — and `replicated` {name: tensor or None}, each a plain
    tensor or a DTensor replicated on the same mesh. The first sharded entry (logits, weight) must be
    a DTensor; the hidden states too when the weight is (`replicated` with a leading "hidden"): a
    plain hidden beside a sharded weight is FSDP's or tensor parallelism's, which ppo_fast will not
    guess."""
    from torch.distributed.tensor import DTensor

    first, (lead, _) = next(iter(sharded.items()))
    if tp_group is not None:
        raise ValueError(f"tp_group: not with DTensor inputs (the group is the {first} DTensor's mesh dimension)")
    if not isinstance(lead, DTensor):
        raise ValueError(f"{first}: expected a DTensor sharded on the vocabulary when other inputs are DTensors, "
                         f"got a {type(lead).__name__}")
    mesh, local = lead.device_mesh, {}
    group_dim = None
    for name, (t, dim) in sharded.items():
        if t is None:
            local[name] = None
            continue
        mesh_dim = _vocab_mesh_dim(t, dim, mesh)
        if mesh_dim is None or group_dim not in (None, mesh_dim):
            seen = t.placements if isinstance(t, DTensor) else f"a {type(t).__name__}"
            raise ValueError(f"{name}: expected a DTensor on the mesh of {first} {tuple(mesh.shape)}, sharded on "
                             f"dimension {dim} (the vocabulary) over one mesh dimension (that of {first}) and "
                             f"replicated over the others; got {seen}")
        group_dim, local[name] = mesh_dim, t.to_local()
    if "hidden" in replicated and not isinstance(replicated["hidden"], DTensor):
        raise ValueError("hidden: a plain tensor beside a DTensor weight is ambiguous: pass the tensor-parallel head's "
                         "hidden states as a DTensor replicated on the weight's mesh (DTensor.from_local(hidden, mesh, "
                         "[Replicate()])), or tp_group= with weight.to_local(), or, for an FSDP-sharded weight, "
                         "weight.full_tensor()")
    for name, t in replicated.items():
        if isinstance(t, DTensor) and (t.device_mesh != mesh or not all(p.is_replicate() for p in t.placements)):
            raise ValueError(f"{name}: expected a plain tensor or a DTensor replicated on the mesh of {first} "
                             f"{tuple(mesh.shape)}; got placements {t.placements}")
        local[name] = t.to_local() if isinstance(t, DTensor) else t
    return mesh.get_group(group_dim), local


def _vocab_mesh_dim(t, dim: int, mesh):
    """The mesh dimension over which t, a DTensor on `mesh`, is sharded on its dimension `dim` while
    replicated over the others; None for anything else."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor) or t.device_mesh != mesh:
        return None
    sharded = [i for i, p in enumerate(t.placements) if p.is_shard(dim % t.ndim)]
    others = [p for i, p in enumerate(t.placements) if i not in sharded]
    return sharded[0] if len(sharded) == 1 and all(p.is_replicate() for p in others) else None


# ----------------------------------------------------------------------------- per-unit partials
def _torch_partials(x: torch.Tensor, with_stats: bool) -> torch.Tensor:
    """Partials [N, len] of transformed logits x [N, V] (the reference: float64 stays float64)."""
    m = x.amax(-1)
    logp_all = torch.log_softmax(x, dim=-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    log_d = torch.logsumexp(x - m[:, None], -1)
    cols = [m, log_d, entropy]
    if with_stats:
        cols += [torch.logsumexp(2 * logp_all, -1), x.sum(-1), torch.full_like(m, x.shape[-1])]
    return torch.stack(cols, -1)


def unit_partials(logits: torch.Tensor, tr: LogitTransform, backend: str, invariant: bool, with_stats: bool):
    """Partials [N, U, k] of the rows of logits [N, V_local]: U = 1 (the shard), or its blocks of
    VOCAB_BLOCK columns in order (the last one shorter at the vocabulary's end)."""
    N, V = logits.shape
    spans = [(b, min(b + VOCAB_BLOCK, V)) for b in range(0, V, VOCAB_BLOCK)] if invariant else [(0, V)] * (V > 0)
    k = 6 if with_stats else 3
    if not spans:  # an empty shard (torch's chunking gives one where V < the group): no unit
        return torch.empty(N, 0, k, device=logits.device, dtype=torch.float32)
    if backend == "torch":
        x = transformed(logits, tr)
        return torch.stack([_torch_partials(x[:, a:b], with_stats) for a, b in spans], 1)
    forward = KERNELS[backend].forward
    out = torch.empty(N, len(spans), k, device=logits.device, dtype=torch.float32)
    full = V // VOCAB_BLOCK if invariant else 0
    pieces = []  # (first unit, logits view [rows, cols] whose rows are (row, unit) in order)
    if full:
        pieces.append((0, logits[:, :full * VOCAB_BLOCK].unflatten(-1, (full, VOCAB_BLOCK))))
    if full < len(spans):
        pieces.append((full, logits[:, full * VOCAB_BLOCK:].unsqueeze(1)))
    for first, view in pieces:
        units = view.shape[1]
        _, entropy, norm, stats = forward(view, None, tr, -100, True, with_stats)
        out[:, first:first + units, M] = norm[..., 0]
        out[:, first:first + units, LOG_D] = norm[..., 1]
        out[:, first:first + units, H] = entropy
        if with_stats:
            out[:, first:first + units, LSSP] = stats[..., 0]
            out[:, first:first + units, X_SUM] = stats[..., 1] * view.shape[-1]
            out[:, first:first + units, COLS] = view.shape[-1]
    return out


def combine(partials: torch.Tensor, with_stats: bool):
    """(norm [N, 2] = (M, log D), entropy [N], stats columns or None) from every unit's partials
    [N, U, k] in global order (the same arithmetic on every rank and for every group size)."""
    m, log_d, h = partials[..., M], partials[..., LOG_D], partials[..., H]
    big = m.amax(-1)
    live = (m != -math.inf) & (log_d != -math.inf)  # a unit of -inf logits adds nothing (d = 0)
    gap = torch.where(live, m - big[:, None], 0.0)
    w = torch.where(live, torch.exp(gap), 0.0)
    d = torch.where(live, torch.exp(log_d), 0.0)
    total = row_sums(w * d)
    log_total = torch.log(total)
    s = row_sums(torch.where(live, w * d * (log_d - h + gap), 0.0))
    norm = torch.stack([big, log_total], -1)
    entropy = log_total - s / total
    if not with_stats:
        return norm, entropy, None
    q = torch.where(live, torch.exp(partials[..., LSSP] + 2 * log_d), 0.0)
    lssp = torch.log(row_sums(w * w * q)) - 2 * log_total
    mean_logit = row_sums(partials[..., X_SUM]) / row_sums(partials[..., COLS])
    return norm, entropy, (lssp, mean_logit)


def gather_units(local: torch.Tensor, group) -> list:
    """[N, U_r, k] of every rank r, in rank order (ranks may hold different numbers of units)."""
    size = dist.get_world_size(group)
    counts = torch.tensor([local.shape[1]], device=local.device)
    every_count = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(every_count, counts, group=group)
    widest = max(int(c.item()) for c in every_count)
    padded = local.new_zeros(local.shape[0], widest, local.shape[2])
    padded[:, :local.shape[1]] = local
    every = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(every, padded.contiguous(), group=group)
    return [t[:, :int(c.item())] for t, c in zip(every, every_count)]


def gather_with_label_logit(partials, x_y, group):
    """(every rank's units [N, U, k] in global order, x_y [N]): one all-gather, the label's x riding
    along as one more unit per rank (its owner's value; 0 elsewhere, so the sum is exact)."""
    extra = x_y[:, None, None].expand(x_y.shape[0], 1, partials.shape[2]).to(partials.dtype)
    every = gather_units(torch.cat([partials, extra], 1), group)  # each rank: its units, then its x_y
    units = torch.cat([t[:, :-1] for t in every], 1)
    return units, torch.stack([t[:, -1, 0] for t in every], -1).sum(-1)


LOCAL_IGNORE, ELSEWHERE = -100, -1  # a shard's label ids for an ignored row and a label in another shard


def shard_label_ids(labels: torch.Tensor, offset: int, local_vocab: int, ignore_index: int) -> torch.Tensor:
    """Global label ids as this shard's, for its kernels (ignore_index LOCAL_IGNORE): label - offset
    where the shard holds it, LOCAL_IGNORE where ignored, else ELSEWHERE. Never label - offset for
    the others (28 on a shard starting at 128 would read as ignored), nor the caller's ignore_index
    (it may be a column id)."""
    local = labels - offset
    mine = (local >= 0) & (local < local_vocab)
    return torch.where(labels == ignore_index, LOCAL_IGNORE, torch.where(mine, local, ELSEWHERE))


def label_logit(logits: torch.Tensor, local_labels: torch.Tensor, tr: LogitTransform) -> torch.Tensor:
    """The transformed logit of each row's label where this rank owns it, else 0 [N] (one rank owns it)."""
    owned = (local_labels >= 0) & (local_labels < logits.shape[-1])
    if logits.shape[-1] == 0:
        return torch.zeros(logits.shape[0], device=logits.device)
    z = logits.gather(-1, torch.where(owned, local_labels, 0)[:, None])
    return torch.where(owned, transformed(z, tr).squeeze(-1).float(), 0.0)


def transformed(logits: torch.Tensor, tr: LogitTransform) -> torch.Tensor:
    """x of the logits as the kernels form it: fp32(z * fp32(1/T)), or the softcapped transform."""
    if tr.softcap is None:
        return reference._upcast(logits) * torch.tensor(tr.inv_t, dtype=torch.float32, device=logits.device)
    return reference.transformed_logits(logits, 1.0 / tr.inv_t, tr.scale, tr.softcap)


NO_COLUMN = torch.iinfo(torch.int64).max


def shard_first_max(logits, tr, offset):
    """(the largest non-NaN x of each row on this shard [N], the global index of its first column
    [N]): is_top1's candidates, found in the forward's own pass over the logits (-inf and NO_COLUMN
    for an empty shard)."""
    if logits.shape[-1] == 0:
        return (torch.full(logits.shape[:1], -math.inf, device=logits.device),
                torch.full(logits.shape[:1], NO_COLUMN, device=logits.device))
    x = transformed(logits, tr)
    x = torch.where(torch.isnan(x), -math.inf, x)
    best, index = x.max(-1)  # the first maximal column
    return best, index + offset


def first_max_column(best, index, big, group):
    """The global index of the first column where x reaches the row's max `big` (NO_COLUMN where no
    column does: a NaN max), from every shard's candidates (shard_first_max), min-reduced over the
    group: is_top1's "the label is the first maximum"."""
    first = torch.where(best >= big.to(best.dtype), index, NO_COLUMN)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    return first


def global_rows(partials, x_y, candidates, labels, ignore_index, group, with_stats):
    """(logp [N] or None without labels, norm [N, 2], entropy [N], stats [N, 3] or None) of the whole
    rows, from this rank's unit partials, label logits x_y and is_top1 candidates (shard_first_max):
    one all-gather, the combine in global order, and with stats one min-reduce for is_top1."""
    units, x_y = gather_with_label_logit(partials, x_y, group)
    norm, entropy, stats = combine(units, with_stats)
    logp = None if labels is None else torch.where(labels == ignore_index, 0.0, (x_y - norm[:, 0]) - norm[:, 1])
    if not with_stats:
        return logp, norm, entropy, None
    first = first_max_column(*candidates, norm[:, 0], group)
    is_top1 = torch.zeros_like(entropy) if labels is None else ((labels != ignore_index) & (first == labels)).float()
    return logp, norm, entropy, torch.stack([stats[0], stats[1], is_top1], -1)


# ----------------------------------------------------------------------------- logits sharded
class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tr, ignore_index, group, invariant, backend, with_stats):
        N, V = logits.shape
        offset, _ = shard_layout(V, group, logits.device, settings_of(logits.dtype, logits.device, tr, invariant),
                                 labels, ignore_index, invariant)
        local_labels = None if labels is None else shard_label_ids(labels, offset, V, ignore_index)
        partials = unit_partials(logits, tr, backend, invariant, with_stats)
        candidates = shard_first_max(logits, tr, offset) if with_stats else None
        x_y = torch.zeros(N, device=logits.device) if labels is None else label_logit(logits, local_labels, tr)
        logp, norm, entropy, stats = global_rows(partials, x_y, candidates, labels, ignore_index, group, with_stats)
        ctx.save_for_backward(logits, local_labels, norm, entropy)
        ctx.tr, ctx.backend = tr, backend
        ctx.set_materialize_grads(False)
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return logp, entropy, stats

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        logits, local_labels, norm, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        grad = _local_backward(logits, local_labels, norm, entropy, grad_logp, grad_entropy, ctx.tr, ctx.backend)
        return grad, None, None, None, None, None, None, None


def _local_backward(logits, local_labels, norm, entropy, grad_logp, grad_entropy, tr, backend):
    """dL/dlogits on this shard from the global (M, log D) and H (local_labels: shard_label_ids)."""
    if local_labels is None:
        grad_logp = None
    if logits.shape[-1] == 0:
        return torch.zeros_like(logits)
    if backend != "torch":
        return KERNELS[backend].backward(logits, local_labels, norm, entropy, grad_logp, grad_entropy, tr, LOCAL_IGNORE)
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        x = transformed(z, tr)  # as the forward's partials formed it
        logp_all = (x - norm[:, :1].to(x.dtype)) - norm[:, 1:].to(x.dtype)
        p = logp_all.exp()
        grad_x = torch.zeros_like(x)
        if grad_logp is not None:
            counted = local_labels != LOCAL_IGNORE
            g = torch.where(counted, grad_logp, 0.0).to(x.dtype)[:, None]
            owned = counted & (local_labels >= 0) & (local_labels < x.shape[-1])
            onehot = torch.zeros_like(x).scatter_(-1, torch.where(owned, local_labels, 0)[:, None],
                                                  owned[:, None].to(x.dtype))
            grad_x = grad_x + g * (onehot - p)
        if grad_entropy is not None:
            grad_x = grad_x - grad_entropy.to(x.dtype)[:, None] * p * torch.where(
                p > 0, logp_all + entropy.to(x.dtype)[:, None], 0.0)
        (grad,) = torch.autograd.grad(x, z, grad_x)
    return grad


def logprobs_from_logits(logits, labels, *, tp_group, temperature=1.0, ignore_index=-100, return_entropy=False,
                         logit_scale=1.0, softcap=None, return_stats=False, invariant=False):
    """logprobs_from_logits on a vocabulary shard logits [..., V_local] (global labels); see the module
    docstring. Called by ppo_fast.ops.logprobs_from_logits with tp_group."""
    tr = LogitTransform.of(temperature, logit_scale, softcap)
    backend = resolve_backend(logits.device, "logprobs_from_logits", KERNELS | {"torch": None})
    shape = logits.shape[:-1]
    flat = logits.reshape(math.prod(shape), logits.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).long()
    logp, entropy, stats = _VocabParallelLogprobs.apply(flat, flat_labels, tr, ignore_index, tp_group, invariant,
                                                        backend, return_stats)
    logp = None if logp is None else logp.view(shape)
    entropy = entropy.view(shape)
    if return_stats:
        return logp, entropy, split_stats(stats.view(*shape, len(STATS)))
    if labels is None:
        return entropy
    return (logp, entropy) if return_entropy else logp


# ----------------------------------------------------------------------------- the LM head sharded
INVARIANT_CHUNK_BYTES = 512 * 2**20  # the invariant mode's chunk budget: fixed, never the free memory


def shard_logits(hidden: torch.Tensor, weight: torch.Tensor, bias, invariant: bool) -> torch.Tensor:
    """hidden [N, H] @ weight.T (+ bias) for a weight shard [V_r, H] (blocked_linear: fixed row
    blocks); invariant: one GEMM per VOCAB_BLOCK columns, so no rounding depends on the shard's size."""
    if not invariant:
        return blocked_linear(hidden, weight, bias)
    blocks = range(0, weight.shape[0], VOCAB_BLOCK)
    parts = [blocked_linear(hidden, weight[a:a + VOCAB_BLOCK], None if bias is None else bias[a:a + VOCAB_BLOCK])
             for a in blocks]
    return torch.cat(parts, -1) if parts else hidden.new_zeros(hidden.shape[0], 0)


def shard_grads(grad_logits, hidden, weight, grads, invariant: bool) -> None:
    """Add this chunk's d_hidden rows, d_weight and d_bias (grads: their accumulators or None) from
    dL/dlogits [n, V_r]. invariant: per VOCAB_BLOCK columns (rows of the weight), d_hidden summed
    over them in float64 — no rounding depends on the shard's size, beyond float64's."""
    from ppo_fast.ops.fused_linear import accumulate_fp32

    grad_h, grad_w, grad_b = grads
    spans = [(a, a + VOCAB_BLOCK) for a in range(0, weight.shape[0], VOCAB_BLOCK)] if invariant else [(0, None)]
    for a, b in spans:
        g = grad_logits[:, a:b]
        if grad_h is not None:
            grad_h += blocked_linear(g, weight[a:b].t(), out_dtype=torch.float32).to(grad_h.dtype)
        if grad_w is not None:
            accumulate_fp32(grad_w[a:b], g.t(), hidden)
        if grad_b is not None:
            grad_b[a:b] += g.sum(0, dtype=torch.float32)


class _VocabParallelLinear(torch.autograd.Function):
    """The fused head on a weight shard: chunks of rows, the partials of every chunk gathered once,
    d_hidden all-reduced once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tr, ignore_index, group, invariant, backend, chunk, with_stats):
        from ppo_fast.ops.fused_linear import BYTES_PER_LOGIT, compute_dtype_of, default_chunk_size, in_compute_dtype
        from ppo_fast.ops.fused_linear import whole_blocks

        N, V = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype_of(hidden)
        offset, total = shard_layout(V, group, hidden.device,
                                     settings_of(dtype, hidden.device, tr, invariant, hidden=hidden.shape[-1]),
                                     labels, ignore_index, invariant)
        if invariant and not chunk:  # chunks from the whole vocabulary and a fixed budget: the same at any TP
            budget = whole_blocks(INVARIANT_CHUNK_BYTES // (total * BYTES_PER_LOGIT))
            chunk = default_chunk_size(N, total, hidden.shape[-1], budget)
        chunk = chunk or max(N, 1)
        w, b = in_compute_dtype(dtype, weight, bias)
        local_labels = shard_label_ids(labels, offset, V, ignore_index)
        parts, x_y = [], torch.zeros(N, device=hidden.device)
        best = torch.empty(N, device=hidden.device) if with_stats else None
        index = torch.empty(N, device=hidden.device, dtype=torch.int64) if with_stats else None
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            logits = shard_logits(hidden[rows].to(dtype), w, b, invariant)
            parts.append(unit_partials(logits, tr, backend, invariant, with_stats))
            x_y[rows] = label_logit(logits, local_labels[rows], tr)
            if with_stats:
                best[rows], index[rows] = shard_first_max(logits, tr, offset)
        partials = torch.cat(parts) if parts else unit_partials(hidden.new_zeros(0, V), tr, "torch", invariant,
                                                                 with_stats)
        logp, norm, entropy, stats = global_rows(partials, x_y, (best, index), labels, ignore_index, group,
                                                 with_stats)
        ctx.save_for_backward(hidden, weight, bias, local_labels, norm, entropy)
        ctx.args = (tr, group, backend, chunk, dtype, invariant)
        ctx.set_materialize_grads(False)
        if stats is not None:
            ctx.mark_non_differentiable(stats)
        return logp, entropy, stats

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        from ppo_fast.ops.fused_linear import in_compute_dtype

        hidden, weight, bias, local_labels, norm, entropy = ctx.saved_tensors
        tr, group, backend, chunk, dtype, invariant = ctx.args
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        w, b = in_compute_dtype(dtype, weight, bias)
        h_dtype = torch.float64 if invariant else torch.float32  # invariant: d_hidden summed in float64
        grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=h_dtype) if want_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if want_b else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, min(start + chunk, hidden.shape[0]))
            h = hidden[rows].to(dtype)
            grad_logits = _local_backward(shard_logits(h, w, b, invariant), local_labels[rows], norm[rows],
                                          entropy[rows], None if grad_logp is None else grad_logp[rows],
                                          None if grad_entropy is None else grad_entropy[rows], tr,
                                          backend).to(dtype)
            shard_grads(grad_logits, h, w, (None if grad_h is None else grad_h[rows], grad_w, grad_b), invariant)
        if want_h:
            dist.all_reduce(grad_h, group=group)  # d_hidden: the sum over the vocabulary's shards
        return (None if grad_h is None else grad_h.float().to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype)) + (None,) * 8


def fused_linear_logprobs(hidden, weight, labels, *, tp_group, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None, logit_scale=1.0, softcap=None, return_stats=False,
                          invariant=False):
    """fused_linear_logprobs on a weight shard [V_local, H] (bias [V_local]; global labels); see the
    module docstring. Called by ppo_fast.ops.fused_linear_logprobs with tp_group."""
    from ppo_fast.ops.fused_linear import FUSED_LINEAR_LOGPROBS, autocast_off, chunk_budget_rows, default_chunk_size

    tr = LogitTransform.of(temperature, logit_scale, softcap)
    backend = resolve_backend(hidden.device, "fused_linear_logprobs", FUSED_LINEAR_LOGPROBS)
    flat_labels = labels.reshape(-1).long()
    flat_hidden = hidden.reshape(flat_labels.numel(), hidden.shape[-1])
    n_rows, local_vocab = flat_labels.numel(), weight.shape[0]  # the one-rank head's chunking, on the shard
    chunk = chunk_size or (0 if invariant else default_chunk_size(n_rows, local_vocab, hidden.shape[-1],
                                                                  chunk_budget_rows(max(local_vocab, 1), hidden.device)))
    with autocast_off(hidden.device):
        logp, entropy, stats = _VocabParallelLinear.apply(flat_hidden, weight, bias, flat_labels, tr, ignore_index,
                                                          tp_group, invariant, backend, chunk, return_stats)
    logp, entropy = logp.view(labels.shape), entropy.view(labels.shape)
    if return_stats:
        return logp, entropy, split_stats(stats.view(*labels.shape, len(STATS)))
    return (logp, entropy) if return_entropy else logp


__all__ = ["VOCAB_BLOCK", "combine", "from_dtensors", "fused_linear_logprobs", "logprobs_from_logits", "shard_layout",
           "unit_partials", "vocab_shards"]
