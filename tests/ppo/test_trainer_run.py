"""Running PPO for real: checkpoint and resume, logs and plots, memory savers."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from support import tiny_config  # noqa: E402

from ppo_fast.ppo import PPOTrainer  # noqa: E402
from ppo_fast.ppo.checkpoint import list_checkpoints  # noqa: E402
from ppo_fast.ppo.models import gradient_checkpointing_on  # noqa: E402

TIMING = ("tokens_per_s", "time_rollout", "time_experience", "time_update", "peak_memory_gb")


def run_config(tmp_path, name, **overrides):
    values = dict(steps=4, ppo_epochs=2, kl_target=1.0, lr_schedule="cosine", warmup_steps=2, entropy_coef=0.01)
    return tiny_config(tmp_path / name, **{**values, **overrides})


def read_metrics(config):
    with open(os.path.join(config.out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def test_resume_continues_exactly(tmp_path):
    straight = run_config(tmp_path, "straight")
    PPOTrainer(straight).train()

    interrupted = run_config(tmp_path, "interrupted", save_every=2)
    trainer = PPOTrainer(interrupted)
    real_step = trainer.step

    def step_then_die():
        metrics = real_step()
        if trainer.step_count == 3:
            raise KeyboardInterrupt  # killed during step 3, after its checkpoint at step 2
        return metrics

    trainer.step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    # ... after it had logged step 3 and begun writing a checkpoint
    with open(os.path.join(interrupted.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": -1.0}) + "\n")
    os.makedirs(os.path.join(interrupted.out, "checkpoints", "step_00000003.tmp"))
    assert [os.path.basename(p) for p in list_checkpoints(interrupted.out)] == ["step_00000002"]

    resumed = PPOTrainer(run_config(tmp_path, "interrupted", save_every=2))
    resumed.train(resume=True)
    assert without_timing(read_metrics(resumed.config)) == without_timing(read_metrics(straight))


def test_checkpoints_every_k_steps_keep_the_newest(tmp_path):
    config = run_config(tmp_path, "run", steps=5, save_every=2, keep_checkpoints=2)
    PPOTrainer(config).train()
    assert [os.path.basename(p) for p in list_checkpoints(config.out)] == ["step_00000004", "step_00000005"]
    assert sorted(os.listdir(list_checkpoints(config.out)[-1])) == ["critic.safetensors", "policy.safetensors",
                                                                  "state.pt"]


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    config = run_config(tmp_path, "run", steps=1)
    assert len(PPOTrainer(config).train(resume=True)) == 1
    assert "no checkpoint" in capsys.readouterr().out


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, capsys):
    from ppo_fast import cli

    out = str(tmp_path / "run")
    assert cli.main(["train", "--out", out, "--steps", "1", "progress=false", "tensorboard=false"]) == 0
    assert cli.main(["train", "--out", out, "--steps", "1", "progress=false"]) == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert cli.main(["train", "--out", out, "--steps", "2", "--resume"]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_tensorboard_events_and_plots(tmp_path):
    from ppo_fast import cli

    config = run_config(tmp_path, "run", steps=2)
    PPOTrainer(config).train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(config.out)
    events.Reload()
    rewards = [e.value for e in events.Scalars("ppo/reward_mean")]
    assert rewards == pytest.approx([m["reward_mean"] for m in read_metrics(config)])
    assert cli.main(["plot", config.out]) == 0
    assert [e.value for e in events.Scalars("ppo/onpolicy_max_log_ratio")] == [0.0, 0.0]  # and in TensorBoard
    for name in ("reward", "kl", "entropy", "clipfrac", "losses", "tokens_per_s", "off_policy"):
        with open(os.path.join(config.out, "plots", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_lora_reference_is_the_policy_without_adapters(tmp_path):
    pytest.importorskip("peft")
    trainer = PPOTrainer(run_config(tmp_path, "lora", lora_rank=4, steps=2, save_every=1))
    assert trainer.reference is None
    names = [name for name, _ in trainer.named_trainable("policy")]
    assert names and all("lora_" in name for name in names)
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    exp, _ = trainer.make_experience(trainer.rollout())
    torch.testing.assert_close(exp.ref_logp, exp.old_logp)  # LoRA B starts at 0
    trainer.train()
    after = dict(trainer.policy.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)  # only adapters moved
    exp, _ = trainer.make_experience(trainer.rollout())
    assert not torch.allclose(exp.ref_logp, exp.old_logp)
    with torch.no_grad():  # and the reference is still the untouched base model
        frozen = PPOTrainer(run_config(tmp_path, "base", steps=2))
        expected = frozen.reference_logprobs(exp.sequences, exp.attention_mask, exp.labels)
    torch.testing.assert_close(exp.ref_logp, expected)


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    plain = PPOTrainer(run_config(tmp_path, "plain", steps=2)).train()
    saver = PPOTrainer(run_config(tmp_path, "ckpt", steps=2, gradient_checkpointing=True, offload=True))
    assert gradient_checkpointing_on(saver.policy) and gradient_checkpointing_on(saver.critic.body)
    for a, b in zip(without_timing(plain), without_timing(saver.train())):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_packed_forward_equals_padded(tmp_path):
    from ppo_fast.ppo import models

    if not models.packing_supported():
        pytest.skip("this transformers cannot pack sequences")
    trainer = PPOTrainer(run_config(tmp_path, "run"))
    exp, _ = trainer.make_experience(trainer.rollout())
    body = models.backbone(trainer.policy)
    with torch.no_grad():
        padded = models.last_hidden(body, exp.sequences, exp.attention_mask)
        packed = models.last_hidden(body, exp.sequences, exp.attention_mask, packed=True)
    real = exp.attention_mask.bool()
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-4, atol=1e-5)
    assert not packed[~real].any()


def test_padding_free_run_matches_padded(tmp_path):
    from ppo_fast.ppo import models

    if not models.packing_supported():
        pytest.skip("this transformers cannot pack sequences")
    padded = PPOTrainer(run_config(tmp_path, "padded", steps=2, padding_free="off")).train()
    packed_trainer = PPOTrainer(run_config(tmp_path, "packed", steps=2, padding_free="on"))
    assert packed_trainer.packed
    for a, b in zip(without_timing(padded), without_timing(packed_trainer.train())):
        if a["step"] > 1:  # after an update, a token whose ratio sits at a clip edge may flip
            a, b = ({k: v for k, v in m.items() if "clipfrac" not in k} for m in (a, b))
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)


def test_bf16_parameters_train_through_fp32_masters(tmp_path):
    """A bf16 run steps fp32 master copies: an update far below bf16's resolution is kept
    there, the bf16 weights are the rounded masters, and a resume restores the masters."""
    config = run_config(tmp_path, "bf16", steps=1, dtype="bfloat16", lr=1e-7, critic_lr=1e-7, warmup_steps=0)
    trainer = PPOTrainer(config)
    policy_masters = trainer.optimizer.masters[0]
    assert all(m.dtype == torch.float32 for m in policy_masters)
    assert all(p.dtype == torch.bfloat16 for p in trainer.optimizer.params[0])
    before = [m.clone() for m in policy_masters]
    trainer.train()
    moved = [not torch.equal(a, b) for a, b in zip(before, policy_masters)]
    assert all(moved)
    for p, master in zip(trainer.optimizer.params[0], policy_masters):
        assert torch.equal(p, master.to(torch.bfloat16))
    resumed = PPOTrainer(config)
    assert resumed.resume_from_latest()
    for a, b in zip(resumed.optimizer.masters[0], policy_masters):
        assert torch.equal(a, b)
    for p, master in zip(resumed.optimizer.params[0], policy_masters):
        assert torch.equal(p, master.to(torch.bfloat16))
