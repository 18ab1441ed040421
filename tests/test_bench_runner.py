"""The benchmark runner's record, table and plots have the documented structure (no timing
assertions: speed lives in benchmarks/)."""
import json
import os

from ppo_fast import bench


def test_record_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("PPO_FAST_BACKEND", "auto")
    record = bench.run("cpu", ops=["gae", "kl_penalty"], quick=True)
    assert {"device", "torch", "triton", "commit", "copy_gbps", "matmul_tflops", "results"} <= set(record)
    assert record["copy_gbps"] > 0 and record["matmul_tflops"] > 0
    rows = record["results"]
    assert {(r["op"], r["mode"]) for r in rows} == {("gae", "fwd"), ("kl_penalty", "fwd"), ("kl_penalty", "fwd+bwd")}
    for r in rows:
        assert {"op", "impl", "mode", "dtype", "shape", "ms", "peak_mem_mb", "gbps", "tflops"} <= set(r)
        assert r["ms"] > 0 and r["gbps"] >= 0
    assert {r["impl"] for r in rows if r["op"] == "gae"} >= {"torch"}

    path = bench.save(record, str(tmp_path))
    with open(path) as f:
        assert json.load(f) == record
    table = open(path.replace(".json", ".md")).read()
    assert "| gae | fwd | float32 | B=16 T=512 | torch |" in table and "1.00x" in table
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        os.path.basename(path).replace(".json", f"-{op}.png") for op in ("gae", "kl_penalty")
    ]


def test_e2e_record_and_table(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    from ppo_fast import bench_e2e
    from ppo_fast.config import PPOConfig

    config = PPOConfig(device="cpu", rollout_batch_size=8, mini_batch_size=8, micro_batch_size=4, ppo_epochs=1)
    record = bench_e2e.run(config, steps=1, warmup=0)
    assert [r["ops"] for r in record["results"]] == ["reference", "fused"]
    for r in record["results"]:
        assert r["tokens"] > 0 and r["steps"] == 1
        assert all(r[f"{phase}_tokens_per_s"] > 0 for phase in bench_e2e.PHASES)
    assert record["speedup"] == record["results"][1]["tokens_per_s"] / record["results"][0]["tokens_per_s"]
    path = bench_e2e.save(record, str(tmp_path))
    assert os.path.basename(path).startswith("e2e-cpu-") and json.load(open(path)) == record
    assert "| fused |" in open(path.replace(".json", ".md")).read()
