"""Benchmarks of the ppo_fast ops against the plain-PyTorch reference.

Every case times one op in one mode ("fwd" or "fwd+bwd") on each implementation available
here: `torch` (the `ppo_fast.reference` function, the baseline), `torch-compile` (the same
under torch.compile, GPU only) and `ppo_fast-<backend>` for every ppo_fast backend that can
run on the device. Each row reports milliseconds (median), peak memory above the inputs
(GPU), and achieved GB/s over the bytes the op must move, which the run also expresses as a
fraction of the device's measured copy bandwidth.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch
from tqdm import tqdm

import ppo_fast
from ppo_fast import reference
from ppo_fast.backend import BackendError, available_backends
from ppo_fast import ops
from ppo_fast.ops import logprobs_from_logits

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


@dataclasses.dataclass
class Case:
    """One op, mode, dtype and shape; `make_inputs()` builds fresh inputs, each impl maps
    inputs -> None (it runs the op once)."""

    op: str
    mode: str
    dtype: torch.dtype
    shape: dict
    make_inputs: Callable[[], dict]
    impls: dict
    bytes_moved: int
    flops: int = 0


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, min_time_s: float = 0.3, max_reps: int = 50) -> float:
    """Median wall time of fn in ms, after warm-up. CUDA: triton.testing.do_bench (CUDA events)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_memory_mb(fn: Callable[[], object], device: torch.device):
    """Peak allocated memory above what was allocated before fn (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate: bytes read + written per second."""
    n = (2**28 if device.type == "cuda" else 2**25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device) -> float:
    """Dense matmul rate: bf16 8192^3 on GPU, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- impls
def backend_impls(device: torch.device, public_fn, reference_fn, *, compile_reference: bool) -> dict:
    """{impl name: function with the op's signature} for every implementation that can run."""
    impls = {"torch": reference_fn}
    if compile_reference:
        impls["torch-compile"] = torch.compile(reference_fn, dynamic=False)
    for name in available_backends(device):
        if name != "torch":
            impls[f"ppo_fast-{name}"] = _on_backend(name, public_fn)
    return impls


def _on_backend(name, fn):
    def run(*args, **kwargs):
        with ppo_fast.use_backend(name):
            return fn(*args, **kwargs)

    return run


# ----------------------------------------------------------------------------- cases
def logprobs_cases(device: torch.device, quick: bool) -> list:
    if device.type == "cuda":
        dtype = torch.bfloat16  # Llama-3-8B (V = 128256) and Qwen2.5-7B (V = 152064) vocabularies
        shapes = [(4096, 32000)] if quick else [(4096, 128256), (8192, 128256), (16384, 128256), (32768, 128256),
                                                (8192, 152064)]
    else:
        dtype = torch.float32
        shapes = [(512, 32000)] if quick else [(2048, 32000)]
    impls = backend_impls(
        device, logprobs_from_logits, reference.logprobs_from_logits, compile_reference=device.type == "cuda"
    )
    impls.update(cross_entropy_peers(device))
    cases = []
    for n, v in shapes:
        def make_inputs(n=n, v=v, grad=False):
            logits = torch.randn(n, v, device=device, dtype=dtype, requires_grad=grad)
            labels = torch.randint(0, v, (n,), device=device)
            up = torch.randn(2, n, device=device)
            return {"logits": logits, "labels": labels, "up_logp": up[0], "up_entropy": up[1]}

        logits_bytes = n * v * dtype.itemsize
        cases.append(Case("logprobs", "fwd", dtype, {"N": n, "V": v}, make_inputs,
                          {k: _logprobs_fwd(f) for k, f in impls.items()}, logits_bytes))
        cases.append(Case("logprobs", "fwd+bwd", dtype, {"N": n, "V": v},
                          lambda make=make_inputs: make(grad=True),
                          {k: _logprobs_fwd_bwd(f) for k, f in impls.items()},
                          3 * logits_bytes))  # read (fwd), read (bwd), write the gradient
    return cases


def fused_linear_cases(device: torch.device, quick: bool) -> list:
    """Hidden states + LM head -> log-probs and entropy; TFLOP/s count the 2NHV of the forward
    GEMM and 6NHV for fwd+bwd (the recompute of ppo_fast's backward is not credited)."""
    if device.type == "cuda":
        dtype = torch.bfloat16
        shapes = [(2048, 4096, 128256)] if quick else [(4096, 4096, 128256), (8192, 4096, 128256),
                                                       (16384, 4096, 128256), (8192, 3584, 152064)]
    else:
        dtype = torch.float32
        shapes = [(512, 256, 32000)] if quick else [(2048, 256, 32000)]
    impls = backend_impls(device, ops.fused_linear_logprobs, reference.fused_linear_logprobs,
                          compile_reference=device.type == "cuda")
    impls.update(liger_impls())
    cases = []
    for n, h, v in shapes:
        def make_inputs(n=n, h=h, v=v, grad=False):
            x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=grad)
            w = (torch.randn(v, h, device=device, dtype=dtype) / h**0.5).requires_grad_(grad)
            up = torch.randn(2, n, device=device)
            return {"logits": x, "weight": w, "labels": torch.randint(0, v, (n,), device=device),
                    "up_logp": up[0], "up_entropy": up[1]}

        io_bytes = (n * h + v * h) * dtype.itemsize
        shape = {"N": n, "H": h, "V": v}
        cases.append(Case("fused_linear_logprobs", "fwd", dtype, shape, make_inputs,
                          {k: _fused_linear_fwd(f) for k, f in impls.items()}, io_bytes, flops=2 * n * h * v))
        cases.append(Case("fused_linear_logprobs", "fwd+bwd", dtype, shape,
                          lambda make=make_inputs: make(grad=True),
                          {k: _fused_linear_fwd_bwd(f) for k, f in impls.items()}, 2 * io_bytes,
                          flops=6 * n * h * v))
    return cases


def liger_impls() -> dict:
    """Liger-Kernel's fused linear cross-entropy (per-token, no entropy), where installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return {}

    def liger(hidden, weight, labels, return_entropy=True):
        nll = liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
        return -nll, None

    return {"liger": liger}


def _logprob_runners(call, grad_keys):
    """(fwd, fwd+bwd) runner factories for an op whose `call(fn, x)` returns (logp, entropy);
    the backward goes to the inputs named by grad_keys."""
    def fwd_bwd(fn):
        def run(x):
            logp, entropy = call(fn, x)
            _backward(x, tuple(x[k] for k in grad_keys), logp, entropy)

        return run

    return (lambda fn: _no_grad(call, fn)), fwd_bwd


_logprobs_fwd, _logprobs_fwd_bwd = _logprob_runners(
    lambda fn, x: fn(x["logits"], x["labels"], return_entropy=True), ("logits",))
_fused_linear_fwd, _fused_linear_fwd_bwd = _logprob_runners(
    lambda fn, x: fn(x["logits"], x["weight"], x["labels"], return_entropy=True), ("logits", "weight"))


def _backward(x, inputs, logp, entropy):
    """Backward from per-token logp (and entropy, where the impl computes it) with the case's
    random upstream gradients."""
    if entropy is None:
        torch.autograd.grad(logp, inputs, x["up_logp"])
    else:
        torch.autograd.grad((logp, entropy), inputs, (x["up_logp"], x["up_entropy"]))


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


# op name -> (public fn, reference fn, call(fn, inputs) -> output, bytes per token fwd, fwd+bwd or None).
# Bytes per token: fp32 inputs read (4 each), a bool mask (1), outputs and gradients written (4 each).
TOKEN_OPS = {
    "ppo_policy_loss": (ops.ppo_policy_loss, reference.ppo_policy_loss,
                        lambda f, x: f(x["x"], x["old"], x["other"], x["mask"], dual_clip=3.0)[0], 13, 17),
    "value_loss": (ops.value_loss, reference.value_loss,
                   lambda f, x: f(x["x"], x["old"], x["other"], x["mask"])[0], 13, 17),
    "kl_penalty": (ops.kl_penalty, reference.kl_penalty,
                   lambda f, x: f(x["x"], x["old"], estimator="k3"), 12, 20),
    "compute_rewards": (ops.compute_rewards, reference.compute_rewards,
                        lambda f, x: f(x["scores"], x["x"], x["old"], x["mask"], kl_coef=0.05), 13, None),
    "gae": (ops.gae, reference.gae, lambda f, x: f(x["other"], x["old"], x["mask"], gamma=1.0, lam=0.95), 17, None),
    "masked_whiten": (ops.masked_whiten, reference.masked_whiten, lambda f, x: f(x["x"], x["mask"]), 9, None),
}


def token_op_cases(op: str, device: torch.device, quick: bool) -> list:
    public, ref, call, bytes_fwd, bytes_fwd_bwd = TOKEN_OPS[op]
    impls = backend_impls(device, public, ref, compile_reference=device.type == "cuda" and op != "gae")
    cases = []
    for B, T in token_shapes(device, quick):
        shape = {"B": B, "T": T}
        cases.append(Case(op, "fwd", torch.float32, shape, lambda B=B, T=T: _token_inputs(device, B, T),
                          {k: _no_grad(call, f) for k, f in impls.items()}, bytes_fwd * B * T))
        if bytes_fwd_bwd:
            cases.append(Case(op, "fwd+bwd", torch.float32, shape,
                              lambda B=B, T=T: _token_inputs(device, B, T, grad=True),
                              {k: _with_grad(call, f) for k, f in impls.items()}, bytes_fwd_bwd * B * T))
    return cases


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


CASES = {"logprobs": logprobs_cases, "fused_linear_logprobs": fused_linear_cases}
CASES.update({op: (lambda device, quick, op=op: token_op_cases(op, device, quick)) for op in TOKEN_OPS})


# ----------------------------------------------------------------------------- runner
def run_case(case: Case, device: torch.device) -> list:
    rows = []
    inputs = case.make_inputs()
    for impl, fn in case.impls.items():
        row = {"op": case.op, "impl": impl, "mode": case.mode, "dtype": str(case.dtype).replace("torch.", ""),
               "shape": case.shape}
        try:
            ms = time_ms(lambda: fn(inputs), device)
            peak = peak_memory_mb(lambda: fn(inputs), device)
        except BackendError:
            continue  # this backend does not implement the op
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "ms": None, "error": "out of memory"})
            continue
        except Exception as err:  # a peer library's API or build problem: record it, keep going
            if impl.startswith(("torch", "ppo_fast")):
                raise
            rows.append({**row, "ms": None, "error": f"{type(err).__name__}: {err}"[:200]})
            continue
        rows.append({
            **row, "ms": round(ms, 4),
            "peak_mem_mb": None if peak is None else round(peak, 1),
            "gbps": round(case.bytes_moved / (ms * 1e-3) / 1e9, 3),
            "tflops": round(case.flops / (ms * 1e-3) / 1e12, 4) if case.flops else None,
        })
    del inputs
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(device=None, *, ops=None, quick=False) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "commit": git_commit(), "date": datetime.date.today().isoformat(), "quick": quick,
        "copy_gbps": round(copy_bandwidth_gbps(device), 1), "matmul_tflops": round(matmul_tflops(device), 2),
        "results": [],
    }
    cases = [case for op in ops or CASES for case in CASES[op](device, quick)]
    progress = tqdm(cases, desc="bench", unit="case")
    for case in progress:
        progress.set_postfix_str(f"{case.op} {case.mode} {' '.join(map(str, case.shape.values()))}")
        record["results"].extend(run_case(case, device))
    return record


def markdown_table(record: dict) -> str:
    """One line per result: time, speed-up over `torch` of the same case, and the achieved rate
    (TFLOP/s for GEMM-bound ops, else GB/s) as a fraction of the rate measured on this device."""
    baseline = {(r["op"], r["mode"], r["dtype"], json.dumps(r["shape"])): r["ms"]
                for r in record["results"] if r["impl"] == "torch" and r["ms"]}
    lines = [
        f"Device: {record['device']} — torch {record['torch']}, triton {record['triton']}, "
        f"copy {record['copy_gbps']} GB/s, matmul {record['matmul_tflops']} TFLOP/s, {record['date']}",
        "",
        "| op | mode | dtype | shape | impl | ms | speed-up vs torch | achieved | % of device limit | peak MB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        base = baseline.get((r["op"], r["mode"], r["dtype"], json.dumps(r["shape"])))
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["ms"] is None:
            lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {shape} | {r['impl']} | {r['error']} | - | - | - | - |")
            continue
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        if r["tflops"]:
            achieved, pct = f"{r['tflops']:.2f} TFLOP/s", 100 * r["tflops"] / record["matmul_tflops"]
        else:
            achieved, pct = f"{r['gbps']:.1f} GB/s", 100 * r["gbps"] / record["copy_gbps"]
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['op']} | {r['mode']} | {r['dtype']} | {shape} | {r['impl']} | {r['ms']:.3f} | "
                     f"{speedup} | {achieved} | {pct:.1f}% | {peak} |")
    return "\n".join(lines)


def plot(record: dict, stem: str) -> list:
    """PNG per op: speed-up over `torch` per case, and peak memory (GPU runs) per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r["op"] for r in record["results"]):
        rows = [r for r in record["results"] if r["op"] == op and r["ms"]]  # OOM / failed rows: none
        labels = list(dict.fromkeys(" ".join(f"{k}={v}" for k, v in r["shape"].items()) for r in rows))
        has_memory = any(r["peak_mem_mb"] is not None for r in rows)
        fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(12 if has_memory else 6.5, 4), squeeze=False)
        base = {(r["mode"], json.dumps(r["shape"])): r for r in rows if r["impl"] == "torch"}
        for (mode, impl) in dict.fromkeys((r["mode"], r["impl"]) for r in rows):
            series = {" ".join(f"{k}={v}" for k, v in r["shape"].items()): r for r in rows
                      if r["mode"] == mode and r["impl"] == impl}
            xs = [x for x in labels if x in series and (mode, json.dumps(series[x]["shape"])) in base]
            speedups = [base[(mode, json.dumps(series[x]["shape"]))]["ms"] / series[x]["ms"] for x in xs]
            axes[0][0].plot(xs, speedups, marker="o", label=f"{impl} {mode}")
            if has_memory:
                axes[0][1].plot(xs, [series[x]["peak_mem_mb"] for x in xs], marker="o", label=f"{impl} {mode}")
        axes[0][0].set(title=f"{op}: speed-up over torch", ylabel="x faster than torch", yscale="log")
        axes[0][0].axhline(1.0, color="grey", lw=0.8)
        if has_memory:
            axes[0][1].set(title=f"{op}: peak memory above inputs", ylabel="MiB")
        for ax in axes[0]:
            ax.legend(fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"{record['device']}, {record['date']}", fontsize=9)
        fig.tight_layout()
        path = f"{stem}-{op}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def result_stem(record: dict, out_dir: str, prefix: str = "", suffix: str = "") -> str:
    """OUT_DIR/<prefix><device slug>-<date><suffix>, created if needed."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "-".join("".join(c if c.isalnum() else " " for c in record["device"].lower()).split())
    return os.path.join(out_dir, f"{prefix}{slug}-{record['date']}{suffix}")


def save(record: dict, out_dir: str = RESULTS_DIR) -> str:
    stem = result_stem(record, out_dir, suffix="-quick" if record["quick"] else "")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(record) + "\n")
    try:
        plot(record, stem)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'ppo_fast[plot]')")
    return stem + ".json"
