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


def train(out, *extra, ranks=1, check=True, torchrun=False):
    launcher = ["torchrun", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 or torchrun else [sys.executable]
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


# ----------------------------------------------------------------------------- tensor_parallel
def padded_vocab_models(tmp_path):
    """A config-only policy and reward model with V = 300 (the digit tokenizer's 12 ids, padded as
    Megatron pads a vocabulary: two 128-column blocks and a partial one), so the two ranks of a
    tensor-parallel group both hold columns in either mode (even split 150 / 150; invariant 256 / 44)."""
    from benchmarks.e2e_models import write

    config = write(str(tmp_path / "models"), vocab=300, hidden=32, layers=1, heads=2)
    return [f"--config={config}", "max_new_tokens=8", "lr=1e-3", "critic_lr=1e-3"]


def whole_head(masters_of_run: dict) -> dict:
    """Masters with the LM head's tensor-parallel shards ("<name>@tp<r>") joined in rank order."""
    joined = {k: v for k, v in masters_of_run.items() if "@tp" not in k}
    for name in {k.split("@tp")[0] for k in masters_of_run if "@tp" in k}:
        shards = sorted((k for k in masters_of_run if k.startswith(name + "@tp")), key=lambda k: int(k.split("@tp")[1]))
        joined[name] = torch.cat([masters_of_run[k] for k in shards])
    return joined


def test_tensor_parallel_two_ranks_take_the_step_of_one(tmp_path):
    """tensor_parallel=2 on 2 processes (the policy's and reference's LM heads split by vocabulary,
    the same rows on both ranks) against 1 process under torchrun (tensor_parallel=1; with
    tensor_parallel_invariant its head is a group of one on the invariant path and the blocks stay
    whole): every metric and every fp32 master bitwise the same after 3 steps; in the default mode
    (the blocks split by the TP plan too) to fp32 rounding (5.7e-7 on the masters here). The invariant run's checkpoint resumes exactly."""
    models = padded_vocab_models(tmp_path)
    one, two, even = (str(tmp_path / name) for name in ("one", "two", "even"))
    train(one, *models, "steps=3", "tensor_parallel_invariant=true", ranks=1, torchrun=True)
    train(two, *models, "steps=3", "tensor_parallel_invariant=true", "tensor_parallel=2", ranks=2)
    train(even, *models, "steps=3", "tensor_parallel=2", ranks=2)
    timing = ("time_", "tokens_per_s", "peak_memory")
    compared = [k for k in metrics(one)[0] if not k.startswith(timing)]
    for key in compared:
        assert [m[key] for m in metrics(two)] == [m[key] for m in metrics(one)], key
    single, split = whole_head(masters(one, 3)), whole_head(masters(two, 3))
    assert set(split) == set(single) and "0.lm_head.weight" in single
    for name, value in single.items():
        assert torch.equal(split[name], value), name
    for name, value in whole_head(masters(even, 3)).items():  # measured: at most 5.7e-7 apart
        torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5, msg=name)
    for key in ("reward_mean", "kl", "grad_norm", "critic_grad_norm", "entropy"):
        assert [m[key] for m in metrics(even)] == pytest.approx([m[key] for m in metrics(one)], rel=1e-4, abs=1e-6)
    assert sorted(os.listdir(os.path.join(two, "checkpoints", "step_00000003"))) == [
        "dcp", "state_rank0.pt", "state_rank1.pt"]

    resumed = str(tmp_path / "resumed")
    train(resumed, *models, "steps=2", "tensor_parallel_invariant=true", "tensor_parallel=2", ranks=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PPO_FAST_BACKEND="auto")
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ppo_fast.cli", "train",
                             "--resume", "--out", resumed, "--steps", "3"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["kl"] for m in metrics(resumed)] == [m["kl"] for m in metrics(two)]
    for name, value in whole_head(masters(resumed, 3)).items():
        assert torch.equal(value, split[name]), name


PLACEMENTS = textwrap.dedent("""
    import sys
    from ppo_fast.ppo import PPOConfig, PPOTrainer
    from ppo_fast.ppo.config import parse_overrides
    from ppo_fast.ppo.distributed import base_model
    config = PPOConfig.from_file(sys.argv[1]).replace({**parse_overrides(sys.argv[3:]), "out": sys.argv[2],
                                                       "device": "cpu", "progress": False})
    trainer = PPOTrainer(config)
    for name, model in (("policy", trainer.policy), ("reference", trainer.reference),
                        ("critic", trainer.critic.body), ("reward", trainer.reward_model)):
        block = base_model(model).layers[0]
        for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            w = block.get_submodule(linear).weight
            tp = [p.dim for d, p in zip(w.device_mesh.mesh_dim_names, w.placements) if d == "tp" and p.is_shard()] \
                if hasattr(w, "placements") else []
            print(f"rank{trainer.world.rank} {name} {linear} tp={tp}")
""")


def test_tensor_parallel_splits_the_blocks_by_the_models_tp_plan(tmp_path):
    """tensor_parallel=2: Llama's transformers TP plan on every model's blocks (q colwise: its weight
    sharded on dim 0 over the tensor dimension of the mesh, o / down rowwise: on dim 1); with tensor_parallel_invariant the
    blocks stay whole (FSDP over the data dimension only)."""
    config = padded_vocab_models(tmp_path)[0].split("=", 1)[1]
    script = tmp_path / "placements.py"
    script.write_text(PLACEMENTS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for extra, q, o in ((["tensor_parallel=2"], "[0]", "[1]"),
                        (["tensor_parallel=2", "tensor_parallel_invariant=true"], "[]", "[]")):
        result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), config,
                                 str(tmp_path / "run"), *extra],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        for rank in (0, 1):
            for model in ("policy", "reference", "critic", "reward"):
                assert f"rank{rank} {model} self_attn.q_proj tp={q}" in result.stdout, result.stdout
                assert f"rank{rank} {model} self_attn.o_proj tp={o}" in result.stdout
                assert f"rank{rank} {model} mlp.down_proj tp={o}" in result.stdout


def test_a_tp_plan_the_group_does_not_divide_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppo_fast.ppo.config import ConfigError
    from ppo_fast.ppo.distributed import split_blocks

    class Mesh:  # the check comes before the mesh is used: its size will do
        def size(self):
            return 2

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=3, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="tensor_parallel=2 does not divide LlamaModel's num_attention_heads=3"):
        split_blocks(model, Mesh())
    model.config.base_model_tp_plan = {"layers.*.self_attn.q_proj": "colwise_gather_output"}
    with pytest.raises(ConfigError, match="styles ppo_fast does not apply: .*colwise_gather_output"):
        split_blocks(model, Mesh())


def test_tensor_parallel_set_ups_are_refused(tmp_path):
    """A group size that does not divide the world (on every rank), no torchrun, ops=reference."""
    result = train(str(tmp_path / "three"), "steps=1", "tensor_parallel=2", "rollout_batch_size=6",
                   "mini_batch_size=6", "micro_batch_size=1", ranks=3, check=False)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("tensor_parallel=2 does not divide the world size 3") == 3
    alone = train(str(tmp_path / "alone"), "steps=1", "tensor_parallel=2", check=False)
    assert alone.returncode != 0 and "tensor_parallel=2 runs the LM head on a process group: it needs torchrun" in alone.stderr
    from ppo_fast.ppo import PPOConfig
    from ppo_fast.ppo.config import ConfigError

    with pytest.raises(ConfigError, match="ops=reference has no tensor-parallel head"):
        PPOConfig(tensor_parallel=2, ops="reference").validate()


def test_a_tied_lm_head_is_not_split():
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppo_fast.ppo.config import ConfigError
    from ppo_fast.ppo.distributed import World

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="ties its LM head to its input embeddings"):
        # the check comes before the group is used: a stand-in for it will do
        World(rank=0, size=2, enabled=True, tp_size=2, tp_group=object()).shard_lm_head(model, invariant=False)
