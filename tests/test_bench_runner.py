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
