"""The GPU run: one command that builds, tests, benchmarks and trains on a CUDA machine and ends
within a wall-time budget (420 s by default), leaving everything in one folder.

    bash .ci/gpu --out DIR              # on a GPU machine (= python3 scripts/gpu_run.py --out DIR)
    bash .ci/gpu --dry-run --out DIR    # every stage's CPU twin at tiny sizes (tests/test_gpu_run.py)

Stages, in order of value, each with its own time budget; time a stage leaves unused goes to the
next one, and a stage the time left cannot fit is skipped with a line in the summary:

    build   the native extensions with 16 jobs for sm_90; fails loudly without ppo_fast._C_cuda
    test    the op tests on CUDA (TEST_FILES: Triton compiled, the cuda backend), 8 processes where
            pytest-xdist is installed, no stop at the first failure
    bench   `ppo-fast bench ops --preset headline` (the goals' sizes; then each policy objective beside
            vanilla PPO), saved after every case
    bench-tp  `ppo-fast bench tp`: one rank's share of the vocabulary-parallel head at TP 1/2/4/8
            (M=2048 H=4096 V=131072 bf16, Liger #1422's shape), the plain op beside it
    train   the embedded default run (200 steps)
    graphs  the CUDA-graph capture test and torch.compile(fullgraph=True) of the fused loss

DIR receives at most six files: summary.txt (how each stage ended, failing tests, the bench
tables, the run's reward), the two benchmark records (JSON and Markdown) and gpu-run.tar.gz with
every log and result. Exit status: the number of stages that failed or were skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKING_RESERVE_S = 10  # kept back from the budget for the summary and the archive

# The op tests worth a GPU's time, in order of value. Left out: tests/ops/test_compile.py (its
# CUDA-graph and fullgraph tests are the `graphs` stage), test_triton_compile.py (the offline sm_90
# build, which the GPU's own JIT supersedes) and the host-only tests (backend choice, constants).
TEST_FILES = [f"tests/ops/test_{name}.py" for name in (
    "logprobs", "numeric_contract", "fused_linear", "fused_linear_ppo_loss", "policy_loss", "objectives",
    "objective_registry", "value_loss", "kl", "gae", "masked", "input_rules", "checks", "dpo", "group_advantages")] + [
    "tests/ops/test_vocab_parallel.py::test_a_group_of_one_agrees_with_the_plain_op"]  # the TP head under NCCL
# The headline bench's op families in order of value: the record is saved after every case, so a
# stage cut short keeps the first ones.
BENCH_ORDER = ("logprobs", "fused_linear_ppo_loss", "gae", "policy_loss", "objectives")
GRAPH_TESTS = ["tests/ops/test_compile.py::test_cuda_graph_capture_and_replay_equal_eager",
               "tests/ops/test_compile.py::test_fullgraph_compile_equals_eager"]


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: float  # its own share of the run
    min_s: float  # below this much time it is skipped rather than started
    commands: list  # argv lists, run one after the other until one fails


def stages(work: str, dry_run: bool) -> list:
    """The stages on a GPU, or their CPU twins at tiny sizes (dry run)."""
    py = sys.executable
    pytest_flags = ["-q", "-rf", "-p", "no:cacheprovider", "--maxfail=10000"]
    if not dry_run and importlib.util.find_spec("xdist"):
        pytest_flags += ["-n", "8"]
    if importlib.util.find_spec("pytest_timeout"):
        pytest_flags += ["--timeout=120"]
    if dry_run:  # the selections must resolve and import; the suite itself runs them on the CPU
        pytest_flags += ["--collect-only"]
    native = "ppo_fast._C" if dry_run else "ppo_fast._C_cuda"
    train = [py, "-m", "ppo_fast.cli", "train", "--out", os.path.join(work, "default-run"), "progress=false"]
    if dry_run:
        train += ["steps=2", "rollout_batch_size=8", "mini_batch_size=8", "micro_batch_size=4", "device=cpu"]
    return [
        Stage("build", 100, 30, [[py, "setup.py", "build_ext", "--inplace"],
                                 [py, "-c", f"import {native}; print('{native} loads')"],
                                 [py, "-m", "ppo_fast.cli", "info"]]),
        Stage("test", 125, 30, [[py, "-m", "pytest", *TEST_FILES, *pytest_flags]]),
        Stage("bench", 85, 20, [[py, "-m", "ppo_fast.cli", "bench", "ops", "--preset", "headline",
                                 *(arg for op in BENCH_ORDER for arg in ("--op", op)),
                                 "--out", os.path.join(work, "results"), *(["--device", "cpu"] if dry_run else [])]]),
        Stage("bench-tp", 25, 10, [[py, "-m", "ppo_fast.cli", "bench", "tp", "--out", os.path.join(work, "results"),
                                    *(["--device", "cpu", "--quick"] if dry_run else [])]]),
        Stage("train", 50, 20, [train]),
        Stage("graphs", 25, 10, [[py, "-m", "pytest", *GRAPH_TESTS, *pytest_flags]]),
    ]


def environment(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if not dry_run:
        env.update(PPO_FAST_REQUIRE_NATIVE="1", MAX_JOBS="16", TORCH_CUDA_ARCH_LIST="9.0")
    return env


def run_command(argv: list, log, timeout_s: float, env: dict) -> int:
    """Run argv in its own process group, its output into `log`; kill the group at the limit (124)."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        return 124


def plan_timeout(stage: Stage, banked_s: float, left_s: float):
    """(timeout, None) for a stage given the time banked by earlier stages and the time left, or
    (None, why) when the stage is skipped."""
    timeout = min(stage.budget_s + banked_s, left_s)
    if timeout < stage.min_s:
        return None, f"skipped: {left_s:.0f}s left, it needs at least {stage.min_s:.0f}s"
    return timeout, None


def run_stages(plan: list, work: str, budget_s: float, env: dict, clock=time.monotonic) -> list:
    """Run the stages within budget_s; returns one result dict per stage."""
    deadline = clock() + budget_s - PACKING_RESERVE_S
    banked, results = 0.0, []
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    for stage in plan:
        timeout, why = plan_timeout(stage, banked, deadline - clock())
        if timeout is None:
            results.append({"stage": stage.name, "verdict": why, "seconds": 0.0, "rc": None})
            continue
        start, rc = clock(), 0
        with open(os.path.join(work, "logs", f"{stage.name}.log"), "w") as log:
            for argv in stage.commands:
                rc = run_command(argv, log, timeout - (clock() - start), env)
                if rc != 0:
                    break
        used = clock() - start
        banked = max(0.0, stage.budget_s + banked - used)
        verdict = "ok" if rc == 0 else f"TIMED OUT after {timeout:.0f}s" if rc == 124 else f"FAILED (exit {rc})"
        results.append({"stage": stage.name, "verdict": verdict, "seconds": round(used, 1), "rc": rc})
    return results


# ----------------------------------------------------------------------------- summary
def test_report(log_text: str) -> list:
    """Counts and failing test ids from a pytest log (also from a run cut short: its -rf lines)."""
    lines = []
    counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|tests? collected|deselected)\b.*?) in [\d.]+s",
                        log_text, re.M)
    if counts:
        lines.append(counts[-1])
    else:
        lines.append("no pytest summary line (cut short?)")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", log_text, re.M)
    lines += [f"FAILED {name}" for name in failed[:40]]
    if len(failed) > 40:
        lines.append(f"... and {len(failed) - 40} more")
    return lines


def train_report(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return ["no metrics.jsonl"]
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        return ["metrics.jsonl is empty"]
    first, last = rows[:10], rows[-10:]
    mean = lambda rs, k: sum(r[k] or 0.0 for r in rs) / len(rs)  # noqa: E731
    seconds = sum(r.get(f"time_{p}", 0.0) for r in rows for p in ("rollout", "experience", "update"))
    return [f"{len(rows)} steps, {seconds:.1f}s in the steps; reward_mean {mean(first, 'reward_mean'):.3f} (first 10) "
            f"-> {mean(last, 'reward_mean'):.3f} (last 10); peak {max(r['peak_memory_gb'] for r in rows):.2f} GB"]


def summary(results: list, work: str, device_lines: list, budget_s: float, elapsed_s: float) -> str:
    out = [f"gpu run {time.strftime('%Y-%m-%d %H:%M:%S')}: {elapsed_s:.0f}s of a {budget_s:.0f}s budget", *device_lines, ""]
    for r in results:
        out.append(f"{r['stage']}: {r['verdict']}" + (f" in {r['seconds']:.0f}s" if r["rc"] is not None else ""))
        log_path = os.path.join(work, "logs", f"{r['stage']}.log")
        if r["rc"] is None or not os.path.exists(log_path):
            continue
        text = open(log_path, errors="replace").read()
        if r["stage"] in ("test", "graphs"):
            detail = test_report(text)
        elif r["stage"] == "train":
            detail = train_report(os.path.join(work, "default-run"))
        elif r["stage"] in ("bench", "bench-tp"):
            detail = bench_table(work, r["stage"]) or text.strip().splitlines()[-3:]
        else:
            detail = text.strip().splitlines()[-4:]
        out += ["    " + line for line in detail]
    return "\n".join(out) + "\n"


def bench_table(work: str, stage: str) -> list:
    """The lines of the stage's table: the ops record's, or the tensor-parallel one's (tp-*)."""
    tables = sorted(path for path in glob.glob(os.path.join(work, "results", "*.md"))
                    if os.path.basename(path).startswith("tp-") == (stage == "bench-tp"))
    return open(tables[-1]).read().strip().splitlines() if tables else []


def device_report(env: dict) -> list:
    lines = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append("gpu: " + (out.stdout.strip() or out.stderr.strip()))
    code = ("import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', "
            "torch.version.cuda, 'triton', triton.__version__, 'devices', torch.cuda.device_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    lines.append(out.stdout.strip() or out.stderr.strip()[-300:])
    return lines


def pack(work: str, out: str) -> list:
    """The archive of every log and result (no weights), and the benchmark record beside it."""
    archive = os.path.join(out, "gpu-run.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            tar.add(os.path.join(work, name), arcname=name,
                    filter=lambda info: None if info.name.endswith((".safetensors", "state.pt")) else info)
    copied = [archive]
    for path in sorted(glob.glob(os.path.join(work, "results", "*.json")) +
                       glob.glob(os.path.join(work, "results", "*.md"))):
        copied.append(shutil.copy(path, out))
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-run"), help="where the files go")
    parser.add_argument("--budget", type=float, default=420.0, help="wall-time budget in seconds")
    parser.add_argument("--dry-run", action="store_true", help="the CPU twin of every stage, at tiny sizes")
    parser.add_argument("--stages", default=None, help="comma-separated subset, e.g. test,bench")
    args = parser.parse_args(argv)

    start = time.monotonic()
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = environment(args.dry_run)
    plan = stages(work, args.dry_run)
    if args.stages:
        wanted = args.stages.split(",")
        unknown = sorted(set(wanted) - {s.name for s in plan})
        if unknown:
            parser.error(f"--stages: unknown {unknown}; stages: {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in wanted]
    device_lines = device_report(env)
    results = run_stages(plan, work, args.budget - (time.monotonic() - start), env)
    text = summary(results, work, device_lines, args.budget, time.monotonic() - start)
    with open(os.path.join(work, "summary.txt"), "w") as f:
        f.write(text)
    pack(work, out)
    shutil.copy(os.path.join(work, "summary.txt"), out)
    shutil.rmtree(work)
    print(text, end="")
    return sum(r["rc"] != 0 for r in results)


if __name__ == "__main__":
    sys.exit(main())
