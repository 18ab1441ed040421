"""The PPO loop under torchrun + FSDP2 on CPU (gloo): two ranks take the step one rank takes with
the same global batch, a sharded checkpoint resumes exactly, rank 0 alone writes the run folder,
and bad set-ups fail on every rank with a clear message."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")

ARGS = ["rollout_batch_size=8", "mini_batch_size=8", "micro_batch_size=2", "ppo_epochs=1", "progress=false",
        "device=cpu", "ops=fused"]
COMPARED = ("reward_mean", "kl", "value_loss", "grad_norm", "critic_grad_norm", "tokens", "response_length")


def train(out, *extra, ranks=1, check=True):
    launcher = ["torchrun", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PPO_FAST_BACKEND="auto")
    result = subprocess.run([*launcher, "-m", "ppo_fast.cli", "train", f"out={out}", *ARGS, *extra],
                            capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def masters(out, step):
    """{group.name: fp32 master} of a checkpoint, single-process (safetensors) or sharded (DCP)."""
    path = os.path.join(out, "checkpoints", f"step_{step:08d}")
    if os.path.isdir(os.path.join(path, "dcp")):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(os.path.join(path, "dcp"), os.path.join(out, "full.pt"))
        return torch.load(os.path.join(out, "full.pt"), weights_only=False)["masters"]
    from safetensors.torch import load_file

    return {f"{group}.{name}": value for group, file in enumerate(("policy", "critic"))
            for name, value in load_file(os.path.join(path, f"{file}.safetensors")).items()}


def assert_same_run(a, b, steps):
    for key in COMPARED:
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4, abs=1e-6), key
    assert [m["policy_loss"] for m in a] == pytest.approx([m["policy_loss"] for m in b], abs=1e-6)
    assert len(a) == len(b) == steps


def test_two_ranks_take_the_step_of_one_rank_with_the_global_batch(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(one, "steps=3", "tensorboard=false")
    train(two, "steps=3", "tensorboard=true", ranks=2)
    assert_same_run(metrics(one), metrics(two), 3)
    for run in (one, two):  # exactly on-policy before each rollout's first update, sharded too
        assert [m["onpolicy_max_log_ratio"] for m in metrics(run)] == [0.0] * 3
    single, sharded = masters(one, 3), masters(two, 3)
    assert set(single) == set(sharded)
    for name, value in single.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # rank 0 alone writes the folder: one metrics line per step, one TensorBoard file, no per-rank files
    assert sorted(os.listdir(two)) == sorted([".lock", "checkpoints", "config.yaml", "metrics.jsonl", "full.pt"] +
                                             [f for f in os.listdir(two) if f.startswith("events.out.tfevents")])
    assert len([f for f in os.listdir(two) if f.startswith("events.out.tfevents")]) == 1
    assert sorted(os.listdir(os.path.join(two, "checkpoints", "step_00000003"))) == [
        "dcp", "state_rank0.pt", "state_rank1.pt"]


def test_a_killed_two_rank_run_resumes_exactly(tmp_path):
    """SIGKILLed (the whole torchrun process group) once its step-2 checkpoint is in place, then
    resumed to step 4: the same metrics and weights as the run that was never interrupted."""
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    train(whole, "steps=4", "tensorboard=false", ranks=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PPO_FAST_BACKEND="auto")
    run = subprocess.Popen(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ppo_fast.cli", "train",
                            f"out={killed}", *ARGS, "steps=4", "tensorboard=false", "save_every=1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, "checkpoints", "step_00000002")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not os.path.isdir(os.path.join(killed, "checkpoints", "step_00000004")), "killed too late to test"
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ppo_fast.cli",
                             "train", "--resume", "--out", killed], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(metrics(whole), metrics(killed), 4)
    for name, value in masters(whole, 4).items():
        torch.testing.assert_close(masters(killed, 4)[name], value, msg=name)


def test_resuming_on_another_world_size_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train(out, "steps=1", "tensorboard=false", ranks=2)
    result = subprocess.run([sys.executable, "-m", "ppo_fast.cli", "train", "--resume", "--out", out, "--steps", "2",
                             "distributed=fsdp"], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "torchrun" in result.stderr


def test_batch_not_divisible_by_the_world_size_fails_on_every_rank(tmp_path):
    result = train(str(tmp_path / "run"), "steps=1", "rollout_batch_size=6", "mini_batch_size=6",
                   "micro_batch_size=1", ranks=4, check=False)
    assert result.returncode != 0
    message = "rollout_batch_size=6 is not divisible by the world size 4"
    assert (result.stdout + result.stderr).count(message) == 4, result.stderr[-3000:]


MISMATCH = textwrap.dedent("""
    import os, sys
    from ppo_fast.ppo import PPOConfig, PPOTrainer
    from ppo_fast.ppo.config import ConfigError
    rank = int(os.environ["RANK"])
    try:
        PPOTrainer(PPOConfig(out=sys.argv[1], device="cpu", lr=1e-5 * (1 + rank), rollout_batch_size=8,
                             mini_batch_size=8, micro_batch_size=2))
    except ConfigError as err:
        print(f"rank {rank}: {err}")
        sys.exit(2)
""")


def test_mismatched_configs_fail_on_every_rank_without_a_hang(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script),
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: the ranks were given different configs: {{'lr': [1e-05, 2e-05]}}" in result.stdout


def test_the_default_config_runs_unchanged_on_two_ranks(tmp_path):
    """No micro_batch_size given: each rank's micro-batch is its share of the minibatch (32 / 2)."""
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PPO_FAST_BACKEND="auto")
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ppo_fast.cli", "train",
                             "--out", out, "--steps", "1", "progress=false", "tensorboard=false"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1]
