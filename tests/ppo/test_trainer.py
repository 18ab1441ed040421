"""The PPO loop: runs, learns the default task, and each stage equals the reference math."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support import DEVICE, assert_close_f64, tiny_config  # noqa: E402

from ppo_fast import ops as fused_ops  # noqa: E402
from ppo_fast.ops import reference  # noqa: E402
from ppo_fast.ppo import ConfigError, PPOConfig, PPOTrainer  # noqa: E402
from ppo_fast.ppo.experience import Rollout  # noqa: E402
from ppo_fast.ppo.models import ValueModel, position_ids  # noqa: E402
from ppo_fast.ppo.rollout import filter_logits, left_pad, sample  # noqa: E402
from ppo_fast.ppo.tasks import hf_digit_tokenizer  # noqa: E402

REQUIRED = ("step", "reward_mean", "reward_std", "kl", "entropy", "clipfrac", "approx_kl", "policy_loss", "value_loss",
            "value_clipfrac", "advantage_mean", "return_mean", "response_length", "skipped_steps", "tokens_per_s",
            "time_rollout", "time_experience", "time_update", "peak_memory_gb")


@pytest.fixture
def trainer(tmp_path):
    return PPOTrainer(tiny_config(tmp_path, whiten_advantages=False))


def test_loop_runs_with_finite_metrics_and_writes_outputs(tmp_path):
    config = tiny_config(tmp_path, steps=3, entropy_coef=0.01, kl_loss_coef=0.1, kl_target=1.0)
    history = PPOTrainer(config).train()
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines == json.loads(json.dumps(history))
    for metrics in lines:
        missing = [k for k in REQUIRED if k not in metrics]
        assert not missing, f"metrics lack {missing}"
        bad = {k: v for k, v in metrics.items() if not (isinstance(v, (int, float)) and abs(v) < float("inf"))}
        assert not bad, f"non-finite metrics {bad}"
    saved = PPOConfig.from_file(str(tmp_path / "run" / "config.yaml"))
    assert saved == config


def test_default_task_reward_rises(tmp_path):
    """The embedded default run, shortened: a fixed seed, the default hyper-parameters."""
    history = PPOTrainer(PPOConfig(out=str(tmp_path), device=DEVICE.type, progress=False, steps=100)).train()
    rewards = [m["reward_mean"] for m in history]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > first + 0.15, f"reward {first:.3f} -> {last:.3f}"


# ----------------------------------------------------------------------------- stages vs reference
def full_logits_logprobs(model, sequences, attention_mask, labels):
    """The plain way: full logits in float64, then reference.logprobs_from_logits."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    P = sequences.shape[1] - labels.shape[1]
    return reference.logprobs_from_logits(out.logits[:, P - 1:-1].double(), labels, return_entropy=True)


def test_experience_matches_reference(trainer):
    rollout = trainer.rollout()
    exp, stats = trainer.make_experience(rollout)
    with torch.no_grad():
        logp, entropy = full_logits_logprobs(trainer.policy, exp.sequences, exp.attention_mask, exp.labels)
        ref_logp, _ = full_logits_logprobs(trainer.reference, exp.sequences, exp.attention_mask, exp.labels)
    assert_close_f64(exp.old_logp, logp, "old_logp", magnitude=4)
    assert_close_f64(exp.ref_logp, ref_logp, "ref_logp", magnitude=4)
    assert float(stats["entropy"]) == pytest.approx(float(reference.masked_mean(entropy, exp.mask)), rel=1e-5)

    texts = trainer.tokenizer.batch_decode(
        [r[m & (r != trainer.tokenizer.eos_token_id)] for r, m in zip(exp.response, exp.mask)])
    scores = torch.tensor(trainer.reward_fn(rollout.prompts, texts), dtype=torch.float64, device=DEVICE)
    assert float(stats["reward_mean"]) == pytest.approx(float(scores.mean()), rel=1e-6)
    rewards = reference.compute_rewards(scores, exp.old_logp.double(), exp.ref_logp.double(), exp.mask,
                                        kl_coef=trainer.config.kl_coef)
    advantages, returns = reference.gae(rewards, exp.old_values.double(), exp.mask, gamma=trainer.config.gamma,
                                        lam=trainer.config.lam)
    assert_close_f64(exp.advantages, advantages, "advantages")
    assert_close_f64(exp.returns, returns, "returns")


def test_whitened_advantages(tmp_path):
    trainer = PPOTrainer(tiny_config(tmp_path))
    exp, stats = trainer.make_experience(trainer.rollout())
    valid = exp.advantages[exp.mask].double()
    assert abs(valid.mean()) < 1e-5 and valid.std() == pytest.approx(1.0, rel=1e-4)


def agg(num_tokens, num_seqs):
    """The loss's agg keywords for the default loss_agg (token-mean) and these counts."""
    return dict(agg="token-mean", num_tokens=num_tokens, num_seqs=num_seqs)


def test_micro_batches_accumulate_to_the_minibatch_gradient(trainer):
    """Loss shares normalised by the minibatch token count: 4 micro-batches == 1 big one."""
    exp, _ = trainer.make_experience(trainer.rollout())
    exp.advantages = torch.randn_like(exp.advantages)  # nonzero policy gradient
    mini = exp.select(slice(0, 8))
    num_tokens, num_seqs = int(mini.mask.sum()), 8

    def grads(micro_size):
        trainer.optimizer.optimizer.zero_grad(set_to_none=True)
        for start in range(0, 8, micro_size):
            loss, _ = trainer.loss(mini.select(slice(start, start + micro_size)), agg(num_tokens, num_seqs))
            loss.backward()
        return [p.grad.clone() for group in trainer.optimizer.params for p in group if p.grad is not None]

    for a, b in zip(grads(2), grads(8)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_update_loss_equals_reference_loss(trainer):
    exp, _ = trainer.make_experience(trainer.rollout())
    exp.advantages = torch.randn_like(exp.advantages)
    _, stats = trainer.loss(exp, agg(int(exp.mask.sum()), exp.mask.shape[0]))
    with torch.no_grad():  # first update step: the policy is still the old policy
        logp, _ = full_logits_logprobs(trainer.policy, exp.sequences, exp.attention_mask, exp.labels)
        values = trainer.critic(exp.sequences, exp.attention_mask, exp.prompt_length).double()
    policy_loss, _ = reference.ppo_policy_loss(logp, exp.old_logp.double(), exp.advantages.double(), exp.mask)
    value_loss, _ = reference.value_loss(values, exp.old_values.double(), exp.returns.double(), exp.mask)
    assert float(stats["policy_loss"]) == pytest.approx(float(policy_loss), abs=1e-5)
    assert float(stats["value_loss"]) == pytest.approx(float(value_loss), rel=1e-4, abs=1e-7)


def test_update_gradient_with_entropy_and_kl_terms_equals_the_reference_ops(tmp_path):
    """The fused policy objective (fused_linear_ppo_loss) and the reference ops' composition give
    the same loss and gradients for every parameter, entropy bonus and KL loss included."""
    trainer = PPOTrainer(tiny_config(tmp_path, entropy_coef=0.01, kl_loss_coef=0.1, kl_loss_estimator="k3"))
    exp, _ = trainer.make_experience(trainer.rollout())
    exp.advantages = torch.randn_like(exp.advantages)
    exp.ref_logp = exp.old_logp + 0.1 * torch.randn_like(exp.old_logp)  # a nonzero KL gradient

    def loss_and_grads(ops):
        trainer.ops = ops
        trainer.optimizer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.loss(exp, agg(int(exp.mask.sum()), exp.mask.shape[0]))
        loss.backward()
        return loss.detach(), [p.grad.clone() for group in trainer.optimizer.params for p in group]

    fused_loss, fused_grads = loss_and_grads(fused_ops)
    plain_loss, plain_grads = loss_and_grads(reference)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(trainer):
    exp, _ = trainer.make_experience(trainer.rollout())
    before = [p.detach().clone() for group in trainer.optimizer.params for p in group]
    real_loss = trainer.loss
    trainer.loss = lambda *a: (lambda loss, stats: (loss * float("nan"), stats))(*real_loss(*a))
    trainer.update(exp)
    after = [p.detach() for group in trainer.optimizer.params for p in group]
    assert trainer.skipped_steps == 2  # 16 sequences / mini-batches of 8, one epoch
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_reference_ops_loop_matches_fused(tmp_path):
    fused = PPOTrainer(tiny_config(tmp_path)).step()
    plain = PPOTrainer(tiny_config(tmp_path, ops="reference")).step()
    for key in ("reward_mean", "kl", "entropy", "policy_loss", "value_loss", "advantage_std"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize("critic", ["policy", "shared"])
def test_critic_modes(tmp_path, critic):
    trainer = PPOTrainer(tiny_config(tmp_path, critic=critic))
    shares = critic == "shared"
    assert (trainer.critic.body is trainer.policy.model) == shares
    metrics = trainer.step()
    assert metrics["value_loss"] > 0 and metrics["skipped_steps"] == 0


# ----------------------------------------------------------------------------- sampling
def test_sampling_with_cache_and_left_padding_matches_uncached_greedy(trainer):
    """top_k=1 is greedy: compare with argmax over full forwards of each prompt alone."""
    tok, model = trainer.tokenizer, trainer.policy
    rows = [tok.encode("12"), tok.encode("345678"), tok.encode("9012")]
    ids, mask = left_pad(rows, tok.pad_token_id, DEVICE)
    response, response_mask, _, _ = sample(model, ids, mask, max_new_tokens=5, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, top_k=1)
    for i, row in enumerate(rows):
        seq = torch.tensor([row], device=DEVICE)
        for t in range(response.shape[1]):
            if not response_mask[i, t]:
                assert response[i, t] == tok.pad_token_id
                continue
            with torch.no_grad():
                expected = model(input_ids=seq).logits[0, -1].argmax()
            assert response[i, t] == expected, (i, t)
            seq = torch.cat([seq, expected.view(1, 1)], dim=1)


def test_response_mask_stops_after_eos(trainer):
    torch.manual_seed(0)
    tok = trainer.tokenizer
    ids, mask = left_pad([tok.encode("123")] * 64, tok.pad_token_id, DEVICE)
    response, response_mask, _, _ = sample(trainer.policy, ids, mask, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    for row, m in zip(response.tolist(), response_mask.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n)
        assert tok.eos_token_id not in row[:n - 1] and all(t == tok.pad_token_id for t in row[n:])
        assert n == len(m) or row[n - 1] == tok.eos_token_id or n == 8


def test_count_task_scores_stopping_and_sees_generated_pads():
    """Stopping right after six right digits scores 1; running on costs a digit per token; a pad
    token the policy generated shows in the text as a wrong token (a policy once padded its way
    to the stop bonus when pads vanished from the decoded text)."""
    from ppo_fast.ppo.tasks import DigitTokenizer, count_reward

    tok = DigitTokenizer()
    digits = [tok.encode(d)[0] for d in "123456"]
    texts = [tok.decode(ids) for ids in (digits + [tok.eos_token_id], digits + digits[:2], digits + [0, 0])]
    assert texts[2] == "123456__"
    assert count_reward(["0"] * 3, texts) == pytest.approx([1.0, 4 / 7, 4 / 7])


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x[0]).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False]
    assert kept(filter_logits(logits[:, [3, 1, 0, 2]], top_p=0.8)) == [False, True, True, False]


def test_value_model_from_reward_model_copies_the_score_head():
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_labels=1, pad_token_id=0)
    reward = transformers.LlamaForSequenceClassification(config)
    critic = ValueModel.from_model(reward)
    assert torch.equal(critic.head.weight, reward.score.weight)
    assert critic.body is not reward.model


# ----------------------------------------------------------------------------- HF models from disk
def ones_reward(prompts, responses):
    """A verifiable reward for the HF tests: the fraction of 1s in the response."""
    return [r.replace(" ", "").count("1") / max(len(r.replace(" ", "")), 1) for r in responses]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny random policy and reward model saved the way users' models are, plus prompts."""
    root = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=13, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "policy")
    config.num_labels = 1
    transformers.LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    config.save_pretrained(root / "config_only")
    for name in ("policy", "config_only"):
        hf_digit_tokenizer().save_pretrained(root / name)
    (root / "prompts.txt").write_text("123\n4567\n89\n0\n")
    return root


def hf_config(tmp_path, hf_dirs, **overrides):
    return tiny_config(tmp_path, policy=str(hf_dirs / "policy"), prompts=str(hf_dirs / "prompts.txt"),
                       max_new_tokens=4, **overrides)


def test_trainer_loads_saved_hf_models(tmp_path, hf_dirs):
    trainer = PPOTrainer(hf_config(tmp_path, hf_dirs, reward_model=str(hf_dirs / "reward")))
    saved_policy = transformers.LlamaForCausalLM.from_pretrained(hf_dirs / "policy")
    saved_reward = transformers.LlamaForSequenceClassification.from_pretrained(hf_dirs / "reward")
    assert torch.equal(trainer.policy.lm_head.weight, saved_policy.lm_head.weight)
    assert torch.equal(trainer.critic.head.weight, saved_reward.score.weight)  # critic auto: from the reward model
    exp, stats = trainer.make_experience(trainer.rollout())
    with torch.no_grad():  # the score is the reward model's output at the last real token
        for i in range(2):
            real = exp.attention_mask[i].bool()
            expected = saved_reward(input_ids=exp.sequences[i][real][None]).logits[0, 0]
            zeros = torch.zeros(exp.labels[i:i + 1].shape)
            one = Rollout(None, exp.sequences[i:i + 1], exp.attention_mask[i:i + 1], exp.labels[i:i + 1],
                          exp.sequences.shape[1] - exp.labels.shape[1], zeros, zeros)
            assert float(trainer.score(one)) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert all(abs(v) < float("inf") for v in trainer.step().values())


def test_trainer_builds_from_a_config_only_directory(tmp_path, hf_dirs):
    config = hf_config(tmp_path, hf_dirs, reward_fn="test_trainer:ones_reward", missing_eos_penalty=-1.0)
    config.policy = str(hf_dirs / "config_only")
    trainer = PPOTrainer(config)
    assert trainer.tokenizer.pad_token_id == 0 and trainer.pad_token_id == 0
    metrics = trainer.train()[-1]
    assert metrics["step"] == 2 and -1.0 <= metrics["reward_mean"] <= 1.0


# ----------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("argv, message", [
    (["bogus_key=1"], "unknown config key(s) ['bogus_key']"),
    (["lr=inf"], "lr: expected a finite number, got inf"),
    (["max_grad_norm=inf"], "max_grad_norm: expected a finite number, got inf"),
    (["temperature=inf"], "temperature: expected a finite number, got inf"),
    (["--seed", "-1"], "seed: expected an integer in [0, 2**63), got -1"),
    (["--seed", str(2**70)], "seed: expected an integer in [0, 2**63)"),
    (["--out", ""], "out: expected a folder path, got ''"),
    (["--out", "/dev/null/run"], "out: '/dev/null/run' would be under '/dev/null', which is a file"),
    (["device=cuda:x"], "device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["device=cuda:99"], "device: 'cuda:99' asked for, but this machine has"),
    (["lr=fast"], "lr: expected float, got 'fast'"),
    (["steps=1.5"], "steps: expected int"),
    (["progress=maybe"], "progress: expected true or false"),
    (["rollout_batch_size=10", "mini_batch_size=4"], "rollout_batch_size (10) must be a multiple of mini_batch_size (4)"),
    (["mini_batch_size=8", "micro_batch_size=3"], "mini_batch_size (8) must be a multiple of micro_batch_size (3)"),
    (["policy=/no/such/model", "prompts=/no/prompts.txt", "reward_fn=x:y"], "policy: '/no/such/model' is not a model directory"),
    (["kl_estimator=k9"], "kl_estimator: expected one of"),
    (["critic=reward"], "critic='reward' needs a reward_model"),
    (["reward_fn=m:f"], "set without `policy`"),
    (["reward_model=/x"], "reward_model: '/x' is not a model directory"),
])
def test_bad_config_is_reported_before_loading(monkeypatch, capsys, argv, message):
    from ppo_fast import cli
    from ppo_fast.ppo import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_reward_fn_and_config_file(tmp_path, hf_dirs):
    from ppo_fast.ppo.config import ConfigError

    with pytest.raises(ConfigError, match="reward_fn: cannot load 'test_trainer:nothing'"):
        hf_config(tmp_path, hf_dirs, reward_fn="test_trainer:nothing").validate()
    (tmp_path / "c.yaml").write_text("lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="lr: expected float"):
        PPOConfig.from_file(str(tmp_path / "c.yaml"))
    (tmp_path / "broken.yaml").write_text("lr: [1, 2\nsteps: 3\n")
    with pytest.raises(ConfigError, match="broken.yaml' is not valid YAML"):
        PPOConfig.from_file(str(tmp_path / "broken.yaml"))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="device: 'cuda' asked for, but this machine has no CUDA device"):
        PPOConfig(device="cuda").validate()


def test_one_rank_world_is_the_identity():
    """Not launched by torchrun, every coupling of the ranks returns its input: the loop has no
    branch for one rank or many."""
    from ppo_fast import ops
    from ppo_fast.ppo.distributed import World

    world = World()
    x, mask = torch.randn(3, 5), torch.rand(3, 5) > 0.3
    stats = {"kl": torch.tensor(0.5)}
    assert world.share(8) == slice(0, 8) and world.sum(x) is x and world.reduce_stats(stats, "cpu", mean=True) is stats
    assert world.all_true(False, "cpu") is False
    assert torch.equal(world.masked_whiten(x, mask, ops), ops.masked_whiten(x, mask))
    model = torch.nn.Linear(2, 2)
    assert world.shard(model) is model


def test_micro_batch_defaults_to_a_ranks_share_of_the_minibatch(tmp_path):
    config = tiny_config(tmp_path, micro_batch_size=None, mini_batch_size=8)
    assert config.resolved_micro_batch_size() == 8 and config.resolved_micro_batch_size(world_size=2) == 4


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the intra-op threads of a run on the CPU")
def test_cpu_threads_follow_the_model_size_unless_set(tmp_path, monkeypatch):
    """auto: one thread for a tiny model (the embedded task's), torch's default for a large one,
    and torch's count untouched when OMP_NUM_THREADS is set; cpu_threads=N: N."""
    from ppo_fast.ppo import models

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    trainer = PPOTrainer(tiny_config(tmp_path))
    assert trainer.cpu_threads == 1 == torch.get_num_threads()
    assert PPOTrainer(tiny_config(tmp_path, cpu_threads=3)).cpu_threads == 3 == torch.get_num_threads()
    large = torch.nn.Linear(4000, 2600, device="meta")  # 10.4M parameters, no memory
    threads = models.set_cpu_threads(0, torch.device("cpu"), large)
    assert threads == models.TORCH_DEFAULT_THREADS == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert models.set_cpu_threads(0, torch.device("cpu"), trainer.policy) == 2 == torch.get_num_threads()
    with pytest.raises(ConfigError, match=r"cpu_threads: expected a value >= 0, got -1"):
        PPOTrainer(tiny_config(tmp_path, cpu_threads=-1))
