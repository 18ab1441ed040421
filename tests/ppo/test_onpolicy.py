"""How off-policy the loop is, measured and kept at zero: the sampler's own log-probs, the
mismatch metrics, an exactly on-policy first update under every setting, the rollout
correction and use_rollout_log_prob, and the recipes (dynamic sampling, overlong shaping,
Dr. GRPO, the objectives) on the embedded task."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from support import DEVICE, tiny_config  # noqa: E402

from ppo_fast.ops import reference  # noqa: E402
from ppo_fast.ppo import ConfigError, PPOConfig, PPOTrainer  # noqa: E402
from ppo_fast.ppo.models import position_ids  # noqa: E402
from ppo_fast.ppo.rollout import filter_logits, left_pad, sample  # noqa: E402

MISMATCH = ("mismatch_k3", "mismatch_max_abs", "mismatch_frac", "onpolicy_max_log_ratio", "max_log_ratio")


def config(tmp_path, **overrides):
    return tiny_config(tmp_path, **{"max_new_tokens": 7, **overrides})


# ----------------------------------------------------------------------------- rollout log-probs
@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 1.0), (3, 1.0, 0.7), (0, 0.8, 1.3), (4, 0.9, 1.0)])
def test_the_samplers_log_probs_are_those_of_the_distribution_it_drew_from(tmp_path, top_k, top_p, temperature):
    """Each token's log-prob under softmax(filter(logits / T)), against full forwards of every prefix
    in float64; the entropy is the unfiltered distribution's at T (as the experience's)."""
    trainer = PPOTrainer(config(tmp_path))
    tok, model = trainer.tokenizer, trainer.policy
    rows = [tok.encode("12"), tok.encode("345678"), tok.encode("9")]
    ids, mask = left_pad(rows, tok.pad_token_id, DEVICE)
    response, response_mask, log_prob, entropy = sample(
        model, ids, mask, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator(DEVICE).manual_seed(3))
    seqs, attn = torch.cat([ids, response], 1), torch.cat([mask, response_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=seqs, attention_mask=attn, position_ids=position_ids(attn)).logits.double()
    P = ids.shape[1]
    x = logits[:, P - 1:-1] / temperature
    want = torch.log_softmax(filter_logits(x, top_k, top_p), -1).gather(-1, response[..., None])[..., 0]
    want_entropy = reference.entropy_from_logits(x)
    m = response_mask
    torch.testing.assert_close(log_prob[m].double(), want[m], rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy[m].double(), want_entropy[m], rtol=0, atol=2e-5)
    assert (log_prob[~m] == 0).all() and (entropy[~m] == 0).all()


def test_mismatch_metrics_are_logged_and_small(tmp_path):
    """Sampler (decode with a KV cache) against the experience pass (prefill): the same head op, so
    what is left is the backbone's; fp32 here, so tiny. Logged every step."""
    history = PPOTrainer(config(tmp_path)).train()
    for metrics in history:
        assert all(k in metrics for k in MISMATCH)
        assert 0 <= metrics["mismatch_max_abs"] < 1e-4 and metrics["mismatch_frac"] == 0
        assert 0 <= metrics["mismatch_k3"] < 1e-8
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert all(f'"{k}"' in lines for k in MISMATCH)


def test_the_head_op_adds_nothing_to_the_gap(tmp_path):
    """The experience's prefill hidden states scored one position at a time, the way the sampler
    scores each decode step ([B, H] rows through fused_linear_logprobs), give bitwise the
    experience's log-probs: what separates rollout and old log-probs is the backbone's decode
    (KV cache) against prefill, not the LM head."""
    from ppo_fast import ops

    trainer = PPOTrainer(config(tmp_path))
    rollout = trainer.rollout()
    experience, _ = trainer.make_experience(rollout)
    hidden = trainer.policy_hidden(experience.sequences, experience.attention_mask, experience.labels)
    head = trainer.policy.get_output_embeddings()
    labels = experience.labels.clamp(min=0)
    per_step = torch.stack([ops.fused_linear_logprobs(hidden[:, t], head.weight, labels[:, t], bias=head.bias,
                                                      temperature=trainer.config.temperature)
                            for t in range(hidden.shape[1])], 1)
    assert torch.equal(per_step[rollout.mask], experience.old_logp[rollout.mask])


# ----------------------------------------------------------------------------- exactly on-policy
ON_POLICY_SETTINGS = {
    "default": {},
    "accumulated micro-batches": dict(micro_batch_size=2),
    "padding_free": dict(padding_free="on"),
    "critic=shared": dict(critic="shared"),
    "lora": dict(lora_rank=4),
    "gradient checkpointing": dict(gradient_checkpointing=True),
    "critic-free grpo": dict(advantage_estimator="grpo", samples_per_prompt=4),
    "sequence ratio": dict(objective_params={"ratio_level": "sequence"}),
}


@pytest.mark.parametrize("setting", ON_POLICY_SETTINGS)
def test_the_first_update_is_exactly_on_policy(tmp_path, setting, monkeypatch):
    """Before the first optimiser step of a rollout, log pi_theta == log pi_old bitwise for every
    token of the first minibatch (the experience and update passes see a row in different
    micro-batches: the ops are batch-invariant)."""
    overrides = ON_POLICY_SETTINGS[setting]
    if setting == "padding_free":
        from ppo_fast.ppo import models

        if not models.packing_supported():
            pytest.skip("this transformers cannot pack sequences")
    if setting == "lora":
        pytest.importorskip("peft")
    history = PPOTrainer(config(tmp_path, steps=2, ppo_epochs=2, **overrides)).train()
    assert [m["onpolicy_max_log_ratio"] for m in history] == [0.0, 0.0]
    assert all(m["max_log_ratio"] > 0 for m in history)  # later minibatches did move: the probe is live


def test_exact_under_the_fused_losss_own_chunking(tmp_path, monkeypatch):
    """A small memory budget: the fused loss chunks whole rows of 7 tokens (126 per chunk) where the
    experience chunks 128 tokens, so a row's logits come from GEMM blocks at other offsets."""
    from ppo_fast.ops import fused_linear

    monkeypatch.setattr(fused_linear, "CPU_BUDGET_BYTES", 128 * fused_linear.BYTES_PER_LOGIT * 20)
    history = PPOTrainer(config(tmp_path, steps=1, rollout_batch_size=64, mini_batch_size=32,
                                micro_batch_size=32)).train()
    assert history[0]["onpolicy_max_log_ratio"] == 0.0


# ----------------------------------------------------------------------------- rollout correction
def test_rollout_correction_weights_reach_the_loss(tmp_path, monkeypatch):
    """rollout_correction=token: the op's weights for the rollout's and the experience's log-probs are
    the is_weights of every fused-loss call, and its stats are logged."""
    from ppo_fast import ops

    seen = []
    real = ops.fused_linear_ppo_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["is_weights"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "fused_linear_ppo_loss", spy)
    trainer = PPOTrainer(config(tmp_path, rollout_correction="token", rollout_correction_high=1.5))
    rollout = trainer.rollout()
    rollout.log_prob = torch.where(rollout.mask, rollout.log_prob - 0.5, 0.0)  # a sampler 0.5 nats off
    experience, stats = trainer.make_experience(rollout)
    want, _, _ = reference.rollout_correction(experience.old_logp, rollout.log_prob, rollout.mask, high=1.5)
    torch.testing.assert_close(experience.is_weights, want.float())
    assert float(stats["is_weight_max"]) == pytest.approx(1.5) and float(stats["is_outside_frac"]) == 1.0
    trainer.update(experience)
    assert seen and all(w is not None for w in seen)
    assert stats["mismatch_frac"] == 0 and float(stats["mismatch_k3"]) == pytest.approx(
        math.exp(0.5) - 0.5 - 1, rel=1e-3)


def test_use_rollout_log_prob_skips_a_forward(tmp_path, monkeypatch):
    """old = the sampler's log-probs: one policy forward fewer per step (counted), the same old
    log-probs to within the decode/prefill gap."""
    counts = {}

    def counting(trainer):
        real = trainer.policy_hidden
        counts[trainer] = 0

        def hidden(*args):
            counts[trainer] += 1
            return real(*args)

        trainer.policy_hidden = hidden
        return trainer

    plain = counting(PPOTrainer(config(tmp_path / "plain", steps=1, critic="policy")))
    fast = counting(PPOTrainer(config(tmp_path / "fast", steps=1, critic="policy", use_rollout_log_prob=True)))
    plain.train()
    fast.train()
    micro_batches = 16 // 4  # rollout_batch_size / micro_batch_size: the experience pass's forwards
    assert counts[plain] - counts[fast] == micro_batches
    rollout = fast.rollout()
    experience, _ = fast.make_experience(rollout)
    assert torch.equal(experience.old_logp, rollout.log_prob)


# ----------------------------------------------------------------------------- recipes
def test_dynamic_sampling_keeps_groups_with_signal(tmp_path):
    """Groups whose scores are all equal are dropped and more prompts sampled; the rounds and the
    fractions are logged; a batch still short after the last round is filled with dropped groups."""
    trainer = PPOTrainer(config(tmp_path, advantage_estimator="grpo", samples_per_prompt=4, dynamic_sampling=True,
                                dynamic_sampling_max_rounds=3))
    rollout = trainer.rollout()
    assert len(rollout) == 16
    grouped = rollout.scores.view(-1, 4)
    informative = (grouped.amax(-1) > grouped.amin(-1)).float().mean()
    stats = rollout.stats
    assert 1 <= stats["dynamic_sampling_rounds"] <= 3
    assert float(informative) == pytest.approx(1 - stats["dynamic_sampling_filler_frac"])
    metrics = trainer.step()
    logged = {"dynamic_sampling_rounds", "dynamic_sampling_informative_frac", "dynamic_sampling_filler_frac"}
    assert logged <= set(metrics)


def test_dynamic_sampling_samples_until_the_batch_has_signal(tmp_path):
    """A reward that is the same for 3 groups out of 4 in the first round: more rounds fill the batch
    with informative groups only."""
    calls = []

    def reward(prompts, responses):
        calls.append(len(prompts))
        if len(calls) == 1:  # the first round: only the first group has distinct scores
            return [float(i) if i < 4 else 1.0 for i in range(len(prompts))]
        return [float(i % 4) for i in range(len(prompts))]

    trainer = PPOTrainer(config(tmp_path, advantage_estimator="grpo", samples_per_prompt=4, dynamic_sampling=True),
                         reward_fn=reward)
    rollout = trainer.rollout()
    assert rollout.stats["dynamic_sampling_rounds"] == 2 and rollout.stats["dynamic_sampling_filler_frac"] == 0
    assert rollout.stats["dynamic_sampling_informative_frac"] == pytest.approx(5 / 8)
    grouped = rollout.scores.view(-1, 4)
    assert bool((grouped.amax(-1) > grouped.amin(-1)).all())


def test_overlong_shaping_penalises_the_tail(tmp_path):
    """DAPO: a response of L tokens past max_new_tokens - buffer loses factor x (L - (max - buffer)) / buffer."""
    plain = PPOTrainer(config(tmp_path / "a"))
    shaped = PPOTrainer(config(tmp_path / "b", overlong_buffer_len=4, overlong_penalty_factor=0.5))
    rollout = plain.rollout()
    lengths = rollout.mask.sum(-1).float()
    want = plain.score(rollout) - 0.5 * ((lengths - 3).clamp(min=0) / 4)
    torch.testing.assert_close(shaped.score(rollout), want)


def test_dr_grpo_centres_without_std_and_sums_over_a_constant(tmp_path, monkeypatch):
    """advantage_estimator=dr_grpo: score minus the group mean, no std division, no whitening;
    loss_agg=seq-mean-token-sum-norm: the losses' token sum over mini_batch_size x max_new_tokens."""
    from ppo_fast import ops

    trainer = PPOTrainer(config(tmp_path, advantage_estimator="dr_grpo", samples_per_prompt=4, kl_coef=0.0,
                                loss_agg="seq-mean-token-sum-norm"))
    rollout = trainer.rollout()
    experience, _ = trainer.make_experience(rollout)
    centred = rollout.scores.view(-1, 4) - rollout.scores.view(-1, 4).mean(-1, keepdim=True)
    torch.testing.assert_close(experience.advantages, centred.reshape(-1, 1) * rollout.mask)  # no KL to go
    seen = []
    real = ops.fused_linear_ppo_loss
    monkeypatch.setattr(ops, "fused_linear_ppo_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    trainer.update(experience)
    assert {(k["agg"], k["num_tokens"]) for k in seen} == {("token-mean", 8.0 * 7)}


@pytest.mark.parametrize("name, params", [("cispo", dict(clip_high=4.0)), ("gpg", {}),
                                          ("sapo", dict(tau_pos=1.0, tau_neg=1.05)), ("clip", dict(ratio_level="sequence")),
                                          ("clip", dict(ratio_level="sequence-token")), ("dro", dict(beta=0.5))])
def test_the_objectives_run_through_the_config(tmp_path, name, params, monkeypatch):
    from ppo_fast import ops

    seen = []
    real = ops.fused_linear_ppo_loss
    monkeypatch.setattr(ops, "fused_linear_ppo_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    history = PPOTrainer(config(tmp_path, steps=1, objective=name, objective_params=params)).train()
    assert seen and all(k["objective"].name == name and all(k["objective"][key] == value for key, value in params.items())
                        for k in seen)
    assert math.isfinite(history[0]["policy_loss"])


def test_objective_params_from_key_value_overrides():
    """`objective_params.clip_high=0.28` on the command line: typed as YAML reads it, merged."""
    from ppo_fast.ppo.config import parse_overrides

    cfg = PPOConfig().replace(parse_overrides(["objective=clip", "objective_params.clip_high=0.28",
                                               "objective_params.dual_clip=3", "objective_params.ratio_level=sequence"]))
    objective = cfg.validate().policy_objective()
    assert (objective["clip_high"], objective["dual_clip"], objective["ratio_level"]) == (0.28, 3.0, "sequence")


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, message", [
    (dict(rollout_correction="token", rollout_correction_high=0.0),
     "rollout_correction_high: expected an upper bound > 0"),
    (dict(rollout_correction="sequence", rollout_correction_low=3.0),
     "rollout_correction_low: expected None or a bound in"),
    (dict(rollout_correction="tokens"), "rollout_correction: expected one of"),
    (dict(rollout_correction="token", use_rollout_log_prob=True), "which is 1 with use_rollout_log_prob=true"),
    (dict(use_rollout_log_prob=True, critic="shared"), "critic='shared' needs it for the values"),
    (dict(dynamic_sampling=True), "samples_per_prompt must be >= 2, got 1"),
    (dict(overlong_buffer_len=8), "overlong_buffer_len (8) must be below max_new_tokens (8)"),
    (dict(objective="gpg", objective_params={"ratio_level": "sequence"}),
     "ratio_level: objective 'gpg' takes no parameter 'ratio_level'"),
    (dict(objective="ppo"), "objective: expected one of"),
    (dict(objective="sapo", objective_params={"tau_neg": 0.0}), "tau_neg"),
    (dict(objective_params={"clip_high": "wide"}), "clip_high: expected a Python float"),
])
def test_bad_recipe_settings_are_config_errors_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PPOConfig(**overrides).validate()


# ----------------------------------------------------------------------------- a quiet default run
def test_a_default_run_prints_no_warning(tmp_path):
    """`ppo-fast train` with the default config (a few steps) under -W error for FutureWarning and
    DeprecationWarning: no warning raised, none logged (transformers' cache API included)."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-m",
                             "ppo_fast.cli", "train", f"out={tmp_path / 'run'}", "steps=3", f"device={DEVICE.type}"],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).lower()
    assert "warning" not in output and "deprecated" not in output, result.stderr[-3000:]
