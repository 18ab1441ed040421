"""scripts/gpu_run.py, the one-command GPU run: its dry run (every stage's CPU twin at tiny sizes)
goes through on this machine, its stages keep to the time budget, and its summary reads a
pytest log right, so the run on a lent GPU cannot die of a typo, a missing import or a
stage that overruns."""
import importlib.util
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
spec = importlib.util.spec_from_file_location("gpu_run", os.path.join(ROOT, "scripts", "gpu_run.py"))
gpu_run = sys.modules["gpu_run"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_run)


def test_dry_run_goes_through_every_stage(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, ".ci", "gpu"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=400)
    summary = (tmp_path / "summary.txt").read_text()
    assert out.returncode == 0, summary + out.stderr[-2000:]
    for stage in ("build", "test", "bench", "bench-tp", "train", "graphs"):
        assert f"\n{stage}: ok in " in summary, summary
    assert "tests collected" in summary and "| ppo_policy_loss | fwd+bwd |" in summary
    assert "| fused_linear_logprobs | fwd+bwd | float32 | N=64 H=32 V=1000 | local | 8 | tp-invariant |" in summary
    assert "2 steps" in summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "gpu-run.tar.gz" in files
    assert any(name.endswith("-headline.json") for name in files) and any(name.endswith("-headline.md") for name in files)
    assert any(name.startswith("tp-") and name.endswith("-quick.json") for name in files)
    with tarfile.open(tmp_path / "gpu-run.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{stage}.log" for stage in ("build", "test", "bench", "bench-tp", "train", "graphs")} <= set(names)
    assert "default-run/metrics.jsonl" in names and not any(n.endswith(".safetensors") for n in names)


def test_the_stage_selections_exist():
    for path in [t.split("::")[0] for t in gpu_run.TEST_FILES + gpu_run.GRAPH_TESTS]:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_the_gpu_budgets_fit_the_run():
    plan = gpu_run.stages("/tmp/x", dry_run=False)
    assert [s.name for s in plan] == ["build", "test", "bench", "bench-tp", "train", "graphs"]
    assert sum(s.budget_s for s in plan) + gpu_run.PACKING_RESERVE_S <= 420


class Clock:
    """A clock that the commands advance: each `sleep N` command takes N fake seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_unused_time_goes_to_the_next_stage_and_a_stage_that_cannot_fit_is_skipped(tmp_path, monkeypatch):
    clock = Clock()

    def fake_run(argv, log, timeout_s, env):
        took = float(argv[1])
        clock.now += min(took, timeout_s)
        return 124 if took > timeout_s else 0

    monkeypatch.setattr(gpu_run, "run_command", fake_run)
    plan = [gpu_run.Stage("a", 50, 5, [["sleep", "10"]]),   # leaves 40 s banked
            gpu_run.Stage("b", 30, 5, [["sleep", "65"]]),   # 30 + 40 = 70 s allowed: fits
            gpu_run.Stage("c", 30, 5, [["sleep", "100"]]),  # 5 + 30 banked... only 25 s left: cut
            gpu_run.Stage("d", 30, 20, [["sleep", "1"]])]   # nothing left: skipped
    results = gpu_run.run_stages(plan, str(tmp_path), budget_s=100 + gpu_run.PACKING_RESERVE_S, env={}, clock=clock)
    verdicts = [(r["stage"], r["verdict"]) for r in results]
    assert verdicts[0] == ("a", "ok") and verdicts[1] == ("b", "ok")
    assert verdicts[2] == ("c", "TIMED OUT after 25s")
    assert verdicts[3][0] == "d" and verdicts[3][1].startswith("skipped: 0s left")
    assert clock.now == 100


def test_a_command_past_its_limit_is_killed_with_its_children(tmp_path):
    with open(tmp_path / "log", "w") as log:
        rc = gpu_run.run_command(["bash", "-c", "sleep 30 & sleep 30"], log, 1.0, dict(os.environ))
    assert rc == 124


def test_summary_reads_pytest_logs():
    log = ("....F..\nFAILED tests/ops/test_gae.py::test_x[cuda] - AssertionError\n"
           "ERROR tests/ops/test_kl.py::test_y\n3 failed, 412 passed, 2 skipped in 101.23s (0:01:41)\n")
    assert gpu_run.test_report(log) == ["3 failed, 412 passed, 2 skipped", "FAILED tests/ops/test_gae.py::test_x[cuda]",
                                        "FAILED tests/ops/test_kl.py::test_y"]
    assert gpu_run.test_report("...\n1021 tests collected in 0.93s\n")[0] == "1021 tests collected"
    assert gpu_run.test_report("....  (killed)")[0].startswith("no pytest summary")


def test_unknown_stage_is_refused(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_run.py"), "--dry-run", "--out",
                          str(tmp_path), "--stages", "build,tset"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown ['tset']" in out.stderr


@pytest.mark.parametrize("stage", ["train"])
def test_a_chosen_subset_of_stages_runs_alone(tmp_path, stage):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_run.py"), "--dry-run", "--out",
                          str(tmp_path), "--stages", stage], capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "summary.txt").read_text()
    assert out.returncode == 0 and f"{stage}: ok" in summary and "build:" not in summary
