"""The benchmark runners' records, tables and plots have the documented structure, and their
figures follow from the timings they report (no timing assertions: speed lives in benchmarks/)."""
import json
import os

import pytest

from ppo_fast.bench import ops, records


def test_op_record_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "auto")
    record = ops.run("cpu", ops=["gae", "kl"], preset="quick")
    assert {"kind", "device", "torch", "triton", "commit", "copy_gbps", "matmul_tflops", "results"} <= set(record)
    assert record["kind"] == "ops" and record["copy_gbps"] > 0 and record["matmul_tflops"] > 0
    rows = record["results"]
    assert {(r["op"], r["fn"], r["mode"]) for r in rows} == {
        ("gae", "gae", "fwd"), ("kl", "kl_penalty", "fwd"), ("kl", "kl_penalty", "fwd+bwd"),
        ("kl", "compute_rewards", "fwd")}
    assert {r["impl"] for r in rows if r["fn"] == "gae"} == {"torch", "ppo_fast-cpp", "ppo_fast-triton"} - (
        set() if os.environ.get("TRITON_INTERPRET") == "1" else {"ppo_fast-triton"})
    for r in rows:
        assert {"op", "fn", "impl", "mode", "dtype", "shape", "ms", "peak_mem_mb", "gbps", "tflops"} <= set(r)
        assert r["ms"] > 0
    # The rates, recomputed here from the documented byte counts (B=16, T=512 on CPU --quick):
    # gae reads rewards, values (4 B each), a bool mask (1) and writes advantages, returns (4 each).
    for r in rows:
        per_token = {"gae": 17, "compute_rewards": 13}.get(r["fn"], 12 if r["mode"] == "fwd" else 20)
        assert r["shape"] == {"B": 16, "T": 512}
        assert r["gbps"] == pytest.approx(per_token * 16 * 512 / (r["ms"] / 1e3) / 1e9, rel=1e-3, abs=1e-3)
        assert r["tflops"] is None

    path = records.save(record, str(tmp_path))
    assert os.path.basename(path).startswith("cpu-") and path.endswith("-quick.json")
    with open(path) as f:
        assert json.load(f) == record
    table = open(path.replace(".json", ".md")).read()
    gae_torch = next(r for r in rows if r["fn"] == "gae" and r["impl"] == "torch")
    assert f"| gae | fwd | float32 | B=16 T=512 | torch | {gae_torch['ms']:.3f} | 1.00x |" in table
    pct = 100 * gae_torch["gbps"] / record["copy_gbps"]
    assert f"{gae_torch['gbps']:.1f} GB/s | {pct:.1f}% |" in table
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        os.path.basename(path).replace(".json", f"-{fn}.png") for fn in ("gae", "kl_penalty", "compute_rewards"))


def test_torch_compile_gets_one_compiled_function_per_case(monkeypatch):
    """One torch.compile object per case and compiled implementation (the reference and
    ppo_fast's op), so no case is past dynamo's recompile limit."""
    from ppo_fast.bench import cases

    compiled = []
    monkeypatch.setattr(cases.torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setattr(cases, "shapes", lambda key, device, preset: [(2, 3), (4, 5), (6, 7)])
    n_cases = len(cases.token_cases("policy_loss", cases.torch.device("cuda"), "quick"))
    assert n_cases == 6 and len(compiled) == 12


def test_e2e_record_and_table(tmp_path):
    pytest.importorskip("transformers")
    from ppo_fast.bench import e2e
    from ppo_fast.ppo import PPOConfig

    config = PPOConfig(device="cpu", rollout_batch_size=8, mini_batch_size=8, micro_batch_size=4, ppo_epochs=1)
    record = e2e.run(config, steps=1, warmup=0)
    assert record["kind"] == "e2e" and [r["ops"] for r in record["results"]] == ["reference", "fused"]
    for r in record["results"]:
        assert r["tokens"] > 0 and r["steps"] == 1
        assert all(r[f"{phase}_tokens_per_s"] > 0 for phase in e2e.PHASES)
    assert record["speedup"] == record["results"][1]["tokens_per_s"] / record["results"][0]["tokens_per_s"]
    path = records.save(record, str(tmp_path))
    assert os.path.basename(path).startswith("e2e-cpu-") and json.load(open(path)) == record
    assert "| fused |" in open(path.replace(".json", ".md")).read()


def test_tensor_parallel_record_and_table(tmp_path):
    """`ppo-fast bench tp` at a tiny size: local rows per TP degree, group rows of two gloo processes,
    the shards' columns, and the bytes exchanged by their documented formula."""
    import torch

    from ppo_fast.bench import tensor_parallel

    shape = dict(N=8, H=16, V=300, dtype=torch.float32)
    record = tensor_parallel.run("cpu", worlds=[2], tp_sizes=[1, 2], shape=shape)
    rows = record["results"]
    assert record["kind"] == "tp" and all(r["ms"] > 0 for r in rows)
    cases = [(fn, mode) for fn in ("fused_linear_logprobs", "logprobs_from_logits") for mode in ("fwd", "fwd+bwd")]
    expected = {(*c, "local", 1, "plain") for c in cases} | {
        (*c, kind, tp, impl) for c in cases for kind, tp in (("local", 1), ("local", 2), ("group", 2))
        for impl in ("tp", "tp-invariant")}
    assert {(r["fn"], r["mode"], r["kind"], r["tp"], r["impl"]) for r in rows} == expected
    assert {r["columns"] for r in rows if r["tp"] == 2} == {256}  # whole 128-column blocks: [0, 256) first
    assert tensor_parallel.vocab_shards(300, 2, aligned=True) == [(0, 256), (256, 300)]
    fused = next(r for r in rows if r["kind"] == "group" and r["fn"] == "fused_linear_logprobs"
                 and r["mode"] == "fwd+bwd" and r["impl"] == "tp-invariant")
    # one other rank's 2 units + its label logit, 3 floats each, per row; d_hidden's ring all-reduce
    assert fused["received_mb"] == round((1 * 8 * (2 + 1) * 3 * 4 + 2 * 1 / 2 * 8 * 16 * 4) / 1e6, 3)
    assert fused["full_logits_mb"] == round(1 / 2 * 8 * 300 * 4 / 1e6, 3)
    path = records.save(record, str(tmp_path))
    assert os.path.basename(path).startswith("tp-cpu-") and json.load(open(path)) == record
    assert "| fused_linear_logprobs | fwd+bwd | float32 | N=8 H=16 V=300 | group | 2 | tp-invariant | 256 |" in \
        open(path.replace(".json", ".md")).read()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_cpu_peak_memory_is_the_growth_above_the_inputs():
    """A call that holds 256 MiB at its peak and frees it reads as ~256 MB, however much the
    process held before."""
    import torch

    from ppo_fast.bench import cpu_memory

    def holds_256_mib(_inputs):
        torch.ones(64 * 2**20).sum()  # 64 Mi float32, touched

    before = torch.ones(128 * 2**20)  # 512 MiB already resident, not counted
    assert cpu_memory.measure_in_this_process(holds_256_mib, None) == pytest.approx(256, rel=0.1)
    del before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_fused_ppo_loss_peak_memory_is_under_a_quarter_of_plain_torch(monkeypatch):
    """The fused PPO loss case (--quick, B=4 T=128 H=256 V=32000), each implementation measured in
    a fresh process: ppo_fast's C++ path adds under 25% of what plain torch adds at its peak."""
    monkeypatch.setenv("PPO_FAST_BACKEND", "auto")
    from ppo_fast.bench import cpu_memory

    fused = cpu_memory.peak_mb("fused_linear_ppo_loss", 0, "ppo_fast-cpp", "quick")
    plain = cpu_memory.peak_mb("fused_linear_ppo_loss", 0, "torch", "quick")
    assert plain > 4 * 4 * 128 * 32000 / 2**20  # the plain way holds several copies of the fp32 logits
    assert 0 < fused < 0.25 * plain, (fused, plain)
