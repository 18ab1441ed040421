"""Benchmark records: one JSON schema per kind ("ops", "e2e", "tp"), one Markdown table and one
save for all, PNG plots for op records. See README "Benchmarks" for the fields."""
from __future__ import annotations

import json
import os


def markdown_table(record: dict) -> str:
    """The record as a Markdown table (op, e2e or tensor-parallel records)."""
    return {"e2e": _e2e_table, "tp": _tp_table}.get(record["kind"], _ops_table)(record)


def _ops_table(record: dict) -> str:
    """One line per result: time, speed-up over `torch` of the same case, and the achieved rate
    (TFLOP/s for GEMM-bound ops, else GB/s) as a fraction of the rate measured on this device."""
    baseline = {_case_key(r): r["ms"] for r in record["results"] if r["impl"] == "torch" and r["ms"]}
    lines = [
        f"Device: {record['device']} — torch {record['torch']}, triton {record['triton']}, "
        f"copy {record['copy_gbps']} GB/s, matmul {record['matmul_tflops']} TFLOP/s, {record['date']}",
        "",
        "| op | mode | dtype | shape | impl | ms | speed-up vs torch | achieved | % of device limit | peak MB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        base = baseline.get(_case_key(r))
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["ms"] is None:
            lines.append(f"| {r['fn']} | {r['mode']} | {r['dtype']} | {shape} | {r['impl']} | {r['error']} | - | - | - | - |")
            continue
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        if r["tflops"]:
            achieved, pct = f"{r['tflops']:.2f} TFLOP/s", 100 * r["tflops"] / record["matmul_tflops"]
        else:
            achieved, pct = f"{r['gbps']:.1f} GB/s", 100 * r["gbps"] / record["copy_gbps"]
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {r['fn']} | {r['mode']} | {r['dtype']} | {shape} | {r['impl']} | {r['ms']:.3f} | "
                     f"{speedup} | {achieved} | {pct:.1f}% | {peak} |")
    return "\n".join(lines)


def plot(record: dict, stem: str) -> list:
    """PNG per op: speed-up over `torch` per case, and peak memory (GPU runs) per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r["fn"] for r in record["results"]):
        rows = [r for r in record["results"] if r["fn"] == op and r["ms"]]  # OOM / failed rows: none
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


def save(record: dict, out_dir: str, plots: bool = True) -> str:
    """Write OUT_DIR/[e2e-]<device>-<date>[-<preset>].json (no suffix for the full preset), the .md
    table beside it and, for op records with `plots`, a PNG per function. Returns the JSON's path."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "-".join("".join(c if c.isalnum() else " " for c in record["device"].lower()).split())
    prefix = {"e2e": "e2e-", "tp": "tp-"}.get(record["kind"], "")
    preset = record.get("preset", "full")
    stem = os.path.join(out_dir, f"{prefix}{slug}-{record['date']}{'' if preset == 'full' else '-' + preset}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(record) + "\n")
    if record["kind"] == "ops" and plots:
        try:
            plot(record, stem)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'ppo_fast[plot]')")
    return stem + ".json"


def _case_key(row: dict):
    return row["fn"], row["mode"], row["dtype"], json.dumps(row["shape"])


def _e2e_table(record: dict) -> str:
    def gb(x):
        return "-" if x is None else f"{x:.2f}"

    shape = record["policy"]
    lines = [f"End-to-end PPO, {record['model']} ({shape['parameters'] / 1e6:.1f}M parameters, V={shape['vocab']}, "
             f"H={shape['hidden']}, {shape['layers']} layers) on {record['device']} (torch {record['torch']}, "
             f"{record['date']}): fused / reference tokens/s = {record['speedup']:.2f}x", "",
             "| ops | tokens/s | rollout | experience | update | peak GB | rollout GB | experience GB | update GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        lines.append(f"| {r['ops']} | {r['tokens_per_s']:.0f} | {r['rollout_tokens_per_s']:.0f} | "
                     f"{r['experience_tokens_per_s']:.0f} | {r['update_tokens_per_s']:.0f} | {gb(r['peak_memory_gb'])} | "
                     f"{gb(r['peak_memory_rollout_gb'])} | {gb(r['peak_memory_experience_gb'])} | "
                     f"{gb(r['peak_memory_update_gb'])} |")
    return "\n".join(lines)


def _tp_table(record: dict) -> str:
    """One line per tensor-parallel row (bench/tensor_parallel.py), its time against the plain op's
    (same function and mode)."""
    plain = {(r["fn"], r["mode"]): r["ms"] for r in record["results"] if r["impl"] == "plain"}
    lines = [f"Vocabulary-parallel head on {record['device']} — torch {record['torch']}, {record['date']}; "
             f"group rows: slowest rank, collectives included; local rows: one rank's share, no communication",
             "", "| op | mode | dtype | shape | rows | tp | impl | columns | ms | plain / this | received MB "
             "| full-logits gather MB |", "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        ratio = plain.get((r["fn"], r["mode"]))
        ratio = f"{ratio / r['ms']:.2f}x" if ratio else "-"
        lines.append(f"| {r['fn']} | {r['mode']} | {r['dtype']} | {shape} | {r['kind']} | {r['tp']} | {r['impl']} | "
                     f"{r['columns']} | {r['ms']:.2f} | {ratio} | {r['received_mb']:.2f} | "
                     f"{r['full_logits_mb']:.2f} |")
    return "\n".join(lines)
