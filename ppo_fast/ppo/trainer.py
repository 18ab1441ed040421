"""PPO for language models: rollout -> experience -> update, step after step, on one device or
many (torchrun + FSDP2: the same loop, whose `world` couples the ranks and is the identity on one).

    trainer = PPOTrainer(PPOConfig(...))          # or pass your own policy / tokenizer / reward
    trainer.train()                               # metrics.jsonl + config.yaml in config.out

One step:
  1. rollout     sample a response to each prompt with a KV cache (ppo_fast.ppo.rollout)
  2. experience  no grad: old and reference log-probs (fused linear -> log-prob, no logits),
                 values, scores; r_t = score on the last token - beta KL_t; GAE; whitening
  3. update      epochs x minibatches x micro-batches; the clipped policy loss (+ entropy
                 bonus, KL loss) and the clipped value loss, normalised by the minibatch's
                 token count so accumulated micro-batches equal one big batch; AdamW on fp32
                 masters, clipping, LR schedule; a non-finite loss or gradient skips the step

`config.ops = "reference"` runs the same loop on `ppo_fast.ops.reference` (the baseline).
"""
from __future__ import annotations

import contextlib
import os
import random
import resource
import time
from collections import defaultdict

import numpy as np
import torch

from ppo_fast import ops as fused_ops
from ppo_fast.ops import reference
from ppo_fast.ppo import distributed, models, tasks
from ppo_fast.ppo.checkpoint import checkpoint_path, list_checkpoints, load_newest, prune_checkpoints, save_checkpoint
from ppo_fast.ppo.config import ConfigError, PPOConfig, load_function
from ppo_fast.ppo.data import PromptCycle, encode, read_prompts
from ppo_fast.ppo.experience import Experience, Rollout, experience_stats, mismatch_stats, rows_in_chunks
from ppo_fast.ppo.kl_controller import AdaptiveKLController, FixedKLController
from ppo_fast.ppo.optim import MasterAdamW
from ppo_fast.ppo.rollout import left_pad, sample
from ppo_fast.ppo.run_folder import RunFolder

# How a micro-batch's statistic adds up to its minibatch's: "share" — already the micro-batch's share
# of the minibatch value (the losses, aggregated with the minibatch's global counts); "token" — a
# token mean over the micro-batch, weighted by its share of the minibatch's tokens; "max" — the
# largest over the micro-batches (|log pi - log pi_old|).
MICRO_STATS = {"policy_loss": "share", "value_loss": "share", "clipfrac": "token", "approx_kl": "token",
               "clipfrac_lower": "token", "value_clipfrac": "token", "max_abs_log_ratio": "max"}


def add_up(how: str, total, value, share):
    """A micro-batch's statistic added to its minibatch's running `total` (None before the first),
    as MICRO_STATS says; `share` is the micro-batch's share of the minibatch's tokens."""
    value = value * share if how == "token" else value
    if total is None:
        return value
    return torch.maximum(total, value) if how == "max" else total + value


class TrainingDiverged(RuntimeError):
    """The run cannot go on: too many non-finite steps in a row, or non-finite sampling logits."""


class PPOTrainer:
    """Policy, reference, critic and reward on one device. Anything not passed in is loaded
    from the config (or, with `config.policy` unset, built for the embedded count task)."""

    def __init__(self, config: PPOConfig, *, policy=None, tokenizer=None, reward_fn=None, reward_model=None,
                 prompts: list[str] | None = None):
        given = (policy, tokenizer, reward_fn, reward_model, prompts)
        self.world = distributed.setup(config.distributed, torch.device(config.resolved_device()).type,
                                       config.tensor_parallel, config.tensor_parallel_invariant)
        self.world.check_same_config(config)  # before anything can fail on one rank only
        self.config = cfg = config.validate(check_sources=all(x is None for x in given))
        self.world.check_sizes(cfg)
        self.micro_batch_size = cfg.resolved_micro_batch_size(self.world.dp_size)
        self.device = torch.device(cfg.resolved_device())
        if self.device.type == "cuda" and self.world.enabled:
            self.device = torch.device("cuda", self.world.local_rank)
        self.dtype = cfg.resolved_dtype()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.sample_generator = torch.Generator(self.device).manual_seed(cfg.seed)  # each rank uses its rows' draws
        self.data_generator = torch.Generator().manual_seed(cfg.seed)  # prompts: the same stream on every rank
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 1 + self.world.dp_rank)  # minibatch rows
        self.ops = reference if cfg.ops == "reference" else fused_ops
        self.objective = cfg.policy_objective()  # the policy objective and its parameters, one object
        self.packed = padding_free(cfg.padding_free, self.device)
        self._load_models(policy, tokenizer, reward_fn, reward_model, prompts)
        self.kl_controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                              else FixedKLController(cfg.kl_coef))
        self.optimizer = MasterAdamW(
            [self.named_trainable("policy"), self.named_trainable("critic")], [cfg.lr, cfg.critic_lr],
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            total_steps=cfg.steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size),
            warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
            fused=self.device.type == "cuda", sharded=self.world.enabled,
            tp_split=(self.world.tp_group, self.tensor_parallel_params()))
        self.step_count = 0
        self.consecutive_skips = 0

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False, run: RunFolder | None = None) -> list[dict]:
        """Run to config.steps, appending each step's metrics to OUT/metrics.jsonl (and
        TensorBoard), checkpointing every `save_every` steps and at the end. `resume` first
        restores the newest complete checkpoint in OUT. The run folder is locked while it runs
        (pass `run`, opened, as the CLI does, to hold it from before the models load)."""
        from tqdm.auto import tqdm

        cfg = self.config
        with contextlib.ExitStack() as stack:
            if run is None:
                run = stack.enter_context(RunFolder(cfg.out, main=self.world.is_main).open(cfg, resume))
            if resume:
                self.resume_from_latest()
            run.begin(self.step_count)
            history = []
            bar = tqdm(range(self.step_count, cfg.steps), desc="ppo", dynamic_ncols=True,
                       disable=not (cfg.progress and self.world.is_main))
            for _ in bar:
                metrics = self.step()
                history.append(metrics)
                run.log(metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}",
                                ent=f"{metrics['entropy']:.2f}", clip=f"{metrics['clipfrac']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                if cfg.save_every and self.step_count % cfg.save_every == 0 and self.step_count < cfg.steps:
                    self.save()
            if not os.path.isdir(checkpoint_path(cfg.out, self.step_count)):
                self.save()
            return history

    def step(self) -> dict:
        """One PPO step; returns its metrics (plain floats)."""
        phases = {}
        rollout = self._timed("rollout", phases, self.rollout)
        experience, stats = self._timed("experience", phases, self.make_experience, rollout)
        update_stats = self._timed("update", phases, self.update, experience)
        stats = {k: float(v) for k, v in {**stats, **update_stats}.items()}  # one device sync for all
        self.kl_controller.update(stats["kl"], self.config.rollout_batch_size)
        self.step_count += 1
        tokens = int(self.world.sum(rollout.attention_mask.sum()))  # every rank's tokens
        step_time = sum(v for k, v in phases.items() if k.startswith("time_"))
        peaks = [v for k, v in phases.items() if k.startswith("peak_memory_")]
        return {
            "step": self.step_count, **stats,
            "kl_coef": self.kl_controller.value, "lr": self.optimizer.lr, "skipped_steps": self.optimizer.skipped,
            "tokens": tokens, "tokens_per_s": tokens / step_time, **phases,
            "peak_memory_gb": max(peaks) if peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }

    # ------------------------------------------------------------------ 1. rollout
    def rollout(self) -> Rollout:
        """This rank's share of rollout_batch_size responses, sampled and scored; with
        dynamic_sampling, only groups whose scores differ while max rounds allow."""
        if not self.config.dynamic_sampling:
            return self.sample_and_score()
        cfg, n = self.config, self.config.samples_per_prompt
        need = len(range(cfg.rollout_batch_size)[self.world.share(cfg.rollout_batch_size)])
        informative, filler, groups, kept = [], [], 0, 0
        for rounds in range(1, cfg.dynamic_sampling_max_rounds + 1):
            batch = self.sample_and_score()
            grouped = batch.scores.view(-1, n)
            signal = (grouped.amax(-1) > grouped.amin(-1)).repeat_interleave(n)  # not all scores equal
            informative.append(batch.select(signal.nonzero().squeeze(-1)))
            filler.append(batch.select((~signal).nonzero().squeeze(-1)))
            groups, kept = groups + len(grouped), kept + int(signal.sum()) // n
            if self.world.all_true(sum(map(len, informative)) >= need, self.device):
                break
        rollout = Rollout.concat(informative + filler, self.pad_token_id)
        rollout = rollout.select(torch.arange(need, device=self.device))
        rollout.stats = {"dynamic_sampling_rounds": float(rounds), "dynamic_sampling_informative_frac": kept / groups,
                         "dynamic_sampling_filler_frac": max(need - kept * n, 0) / need}
        return rollout

    def sample_and_score(self) -> Rollout:
        cfg = self.config
        n = cfg.samples_per_prompt  # the same global batch on every rank; each prompt n times in a row
        prompts = [p for p in self.prompt_source(cfg.rollout_batch_size // n) for _ in range(n)]
        mine = self.world.share(cfg.rollout_batch_size)
        prompts = prompts[mine]
        rows = [encode(self.tokenizer, p)[-cfg.max_prompt_length:] for p in prompts]
        prompt_ids, prompt_mask = left_pad(rows, self.pad_token_id, self.device)
        try:
            sampled = sample(self.policy, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                             eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_token_id,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             generator=self.sample_generator, rows=(mine.start, cfg.rollout_batch_size),
                             all_ranks=lambda flag: self.world.all_true(flag, self.device), ops=self.ops)
        except FloatingPointError as err:
            raise TrainingDiverged(f"step {self.step_count + 1}: {err}; the policy has diverged (lower lr?). "
                                   f"The newest checkpoint in {cfg.out!r} is from before it") from None
        rollout = Rollout.from_sampling(prompts, prompt_ids, prompt_mask, *sampled)
        with self.frozen_models_on_device():
            rollout.scores = self.score(rollout)
        return rollout

    # ------------------------------------------------------------------ 2. experience
    @torch.no_grad()
    def make_experience(self, rollout: Rollout):
        """Experience for the update, and its statistics (tensors)."""
        cfg, ops = self.config, self.ops
        seqs, attn, labels, mask, scores = (rollout.sequences, rollout.attention_mask, rollout.labels, rollout.mask,
                                            rollout.scores)
        # the micro-batches of the first epoch's first minibatches, row for row: the update's first
        # forwards see exactly the batches the old log-probs came from (exactly on-policy, whatever
        # the backbone's kernels do with batch shapes)
        order = torch.randperm(len(labels), generator=self.shuffle_generator).to(self.device)
        micro = self.micro_batch_size
        maxima = {}
        if cfg.use_rollout_log_prob:  # old = the sampler's: no policy forward
            old_logp, entropy = rollout.log_prob, rollout.entropy
            values = rows_in_chunks(lambda s, a, lab: self.values(None, s, a, lab), micro, seqs, attn, labels,
                                    order=order)
        else:
            old_logp, entropy, values = rows_in_chunks(lambda s, a, lab: self.policy_outputs(s, a, lab, True),
                                                       micro, seqs, attn, labels, order=order)
            mismatch, maxima = mismatch_stats(old_logp, rollout.log_prob, mask, ops)
        with self.frozen_models_on_device():
            ref_logp = rows_in_chunks(self.reference_logprobs, micro, seqs, attn, labels, order=order)
        rewards = ops.compute_rewards(torch.zeros_like(scores) if cfg.critic_free else scores, old_logp, ref_logp,
                                      mask, kl_coef=self.kl_controller.value, estimator=cfg.kl_estimator)
        if cfg.critic_free:  # the group's advantage on every token, plus the KL penalty still to come
            kl_to_go, _ = ops.gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
            advantages = self.group_advantages(scores)[:, None] * mask + kl_to_go
            returns = advantages
        else:
            advantages, returns = ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        stats = experience_stats(scores, old_logp, ref_logp, entropy, values, advantages, returns, mask,
                                 rollout.prompt_mask, ops)
        stats.update(rollout.stats, **({} if cfg.use_rollout_log_prob else mismatch))
        is_weights = None
        if cfg.rollout_correction != "off":
            is_weights, _, correction = ops.rollout_correction(
                old_logp, rollout.log_prob, mask, level=cfg.rollout_correction, mode=cfg.rollout_correction_mode,
                low=cfg.rollout_correction_low, high=cfg.rollout_correction_high)
            maxima["is_weight_max"] = correction.pop("is_weight_max")
            stats.update({k: correction[k] for k in ("is_weight_mean", "is_outside_frac")})
        stats = self.world.reduce_stats(stats, self.device, mean=True)  # the mean over ranks of each rank's
        stats.update(self.world.max(maxima, self.device))
        if cfg.whiten_advantages and cfg.advantage_estimator in ("gae", "reinforce_baseline"):  # every rank's tokens
            advantages = self.world.masked_whiten(advantages, mask, ops)
        experience = Experience(sequences=seqs, attention_mask=attn, labels=labels, old_logp=old_logp,
                                ref_logp=ref_logp, old_values=values, advantages=advantages, returns=returns,
                                is_weights=is_weights, first_epoch_order=order)
        return experience, stats

    def group_advantages(self, scores):
        """Per-sequence advantages [B] from the groups of samples_per_prompt responses to a prompt
        (grpo: z-score in the group; rloo: minus the others' mean; reinforce_baseline: minus the
        group mean, whitened over the batch afterwards; dr_grpo: minus the group mean, no std)."""
        mode = {"grpo": "grpo", "rloo": "rloo", "reinforce_baseline": "none",
                "dr_grpo": "none"}[self.config.advantage_estimator]
        return self.ops.group_advantages(scores, self.config.samples_per_prompt, mode=mode)

    def policy_outputs(self, sequences, attention_mask, labels, return_entropy=False):
        """(log-probs, entropy or None, values) [B, R]."""
        hidden = self.policy_hidden(sequences, attention_mask, labels)
        out = self.head_logprobs(self.policy, hidden, labels, return_entropy)
        logp, entropy = out if return_entropy else (out, None)
        return logp, entropy, self.values(hidden, sequences, attention_mask, labels)

    def policy_hidden(self, sequences, attention_mask, labels):
        """The policy's last hidden states at the response positions [B, R, H]."""
        prompt_length = sequences.shape[1] - labels.shape[1]
        return models.response_hidden(self.policy, sequences, attention_mask, prompt_length, self.packed)

    def values(self, policy_hidden, sequences, attention_mask, labels):
        """Values [B, R]; a shared critic reuses the policy's hidden states; zeros without a critic."""
        if self.critic is None:
            return torch.zeros(labels.shape, device=labels.device)
        if self.config.critic == "shared":
            return self.critic.values_from_hidden(policy_hidden)
        return self.critic(sequences, attention_mask, sequences.shape[1] - labels.shape[1], self.packed)

    def reference_logprobs(self, sequences, attention_mask, labels):
        """Log-probs under the frozen reference (with LoRA: the policy with adapters disabled)."""
        prompt_length = sequences.shape[1] - labels.shape[1]
        lora = self.peft_policy is not None
        model = self.policy if lora else self.reference
        with self.peft_policy.disable_adapter() if lora else contextlib.nullcontext():
            hidden = models.response_hidden(model, sequences, attention_mask, prompt_length, self.packed)
        return self.head_logprobs(model, hidden, labels)

    def head_logprobs(self, model, hidden, labels, return_entropy=False):
        """Log-probs of labels [B, R] (and entropy) from hidden states [B, R, H] and lm_head.weight."""
        head = model.get_output_embeddings()
        return self.ops.fused_linear_logprobs(hidden, head.weight, labels, bias=head.bias,
                                              temperature=self.config.temperature, return_entropy=return_entropy,
                                              **distributed.head_group(head))

    @torch.no_grad()
    def score(self, rollout: Rollout) -> torch.Tensor:
        """Sequence scores [B] from the reward model or function, with the no-EOS penalty and the
        overlong shaping."""
        cfg = self.config
        response, mask = rollout.response, rollout.mask
        ended = (response == self.tokenizer.eos_token_id).any(-1)
        if self.reward_model is not None:
            scores = rows_in_chunks(lambda s, a: models.reward_model_scores(self.reward_model, s, a, self.packed),
                                    self.micro_batch_size, rollout.sequences, rollout.attention_mask)
        else:
            lengths = (mask.sum(-1) - ended.long()).tolist()  # response tokens before EOS
            texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(response.tolist(), lengths)],
                                                skip_special_tokens=True)
            scores = torch.as_tensor(self.reward_fn(rollout.prompts, texts), dtype=torch.float32).to(self.device)
            if scores.shape != (len(rollout.prompts),) or not bool(torch.isfinite(scores).all()):
                raise ValueError(f"reward_fn: expected {len(rollout.prompts)} finite scores, got shape "
                                 f"{tuple(scores.shape)} with values {scores.tolist()[:8]}...")
        if cfg.missing_eos_penalty is not None:
            scores = scores + cfg.missing_eos_penalty * (~ended).float()
        if cfg.overlong_buffer_len:  # DAPO: -factor x (length - (max - buffer)) / buffer past max - buffer
            excess = mask.sum(-1).float() - (cfg.max_new_tokens - cfg.overlong_buffer_len)
            scores = scores - cfg.overlong_penalty_factor * (excess.clamp(min=0) / cfg.overlong_buffer_len)
        return scores

    # ------------------------------------------------------------------ 3. update
    def update(self, experience: Experience) -> dict:
        """ppo_epochs x minibatches, each an optimiser step over accumulated micro-batches."""
        cfg = self.config
        for model in (self.policy, self.critic):  # dropout is off: only gradient checkpointing reads this
            if model is not None:
                model.train()
        totals, n_steps, onpolicy, peak = defaultdict(float), 0, None, None
        try:
            for epoch in range(cfg.ppo_epochs):
                order = experience.first_epoch_order if epoch == 0 else None
                if order is None:  # later epochs, or an experience made elsewhere
                    order = torch.randperm(len(experience.labels), generator=self.shuffle_generator).to(self.device)
                for rows in order.split(cfg.mini_batch_size // self.world.dp_size):
                    stats = self.minibatch_step(experience.select(rows))
                    largest = stats.pop("max_abs_log_ratio")
                    onpolicy = largest if onpolicy is None else onpolicy  # before any optimiser step
                    peak = largest if peak is None else torch.maximum(peak, largest)
                    for key, value in stats.items():
                        totals[key] = totals[key] + value
                    n_steps += 1
        finally:
            for model in (self.policy, self.critic):
                if model is not None:
                    model.eval()
        return {**{key: value / n_steps for key, value in totals.items()}, "onpolicy_max_log_ratio": onpolicy,
                "max_log_ratio": peak}

    def minibatch_step(self, mini: Experience) -> dict:
        """One optimiser step: each micro-batch's loss is its share of the minibatch's mean over
        every rank (the global counts), so their gradients accumulate to the minibatch's; then the
        step. Returns the minibatch's statistics over every rank, each added up as MICRO_STATS says."""
        cfg = self.config
        token_counts = mini.mask.sum(-1)
        counts = self.world.sum(torch.stack([token_counts.sum(), (token_counts > 0).sum()]).double())  # global
        num_tokens, num_seqs = (max(int(c), 1) for c in counts.tolist())
        agg = dict(agg=cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
        if cfg.loss_agg == "seq-mean-token-sum-norm":  # Dr. GRPO: the token sum over a constant
            agg = dict(agg="token-mean", num_tokens=float(cfg.mini_batch_size * cfg.max_new_tokens), num_seqs=None)
        stats, loss_sum = {}, torch.zeros((), device=self.device)
        for start in range(0, len(mini.labels), self.micro_batch_size):
            micro = mini.select(slice(start, start + self.micro_batch_size))
            loss, micro_stats = self.loss(micro, agg)
            (loss * self.world.dp_size).backward()  # FSDP averages over data shards: ×their count gives the sum
            loss_sum = loss_sum + loss.detach()
            share = micro.mask.sum() / num_tokens
            for key, value in micro_stats.items():
                stats[key] = add_up(MICRO_STATS[key], stats.get(key), value, share)
        largest = {"max_abs_log_ratio": stats.pop("max_abs_log_ratio")}
        stats = self.world.reduce_stats({**stats, "loss": loss_sum}, self.device, mean=False)  # over all ranks
        stats.update(self.world.max(largest, self.device))
        self.world.average_replicated_grads([p for group in self.optimizer.params for p in group])
        skipped_before = self.optimizer.skipped
        stats["grad_norm"], stats["critic_grad_norm"] = self.optimizer.step(stats.pop("loss"))
        self._count_skips(self.optimizer.skipped > skipped_before)
        return stats

    def loss(self, batch: Experience, agg: dict):
        """A micro-batch's loss, aggregated as `agg` says (the losses' agg keywords), and its statistics:
        the policy objective (cfg.objective - entropy bonus + KL loss) straight from the hidden states
        (`fused_linear_ppo_loss`: its gradient is formed in the forward), plus vf_coef x the value loss."""
        cfg, ops = self.config, self.ops
        hidden = self.policy_hidden(batch.sequences, batch.attention_mask, batch.labels)
        head = self.policy.get_output_embeddings()
        with_kl = cfg.kl_loss_coef > 0
        loss, policy_stats = ops.fused_linear_ppo_loss(
            hidden, head.weight, batch.labels, batch.old_logp, batch.advantages, batch.mask, bias=head.bias,
            temperature=cfg.temperature, ref_log_prob=batch.ref_logp if with_kl else None,
            kl_coef=cfg.kl_loss_coef, kl_estimator=cfg.kl_loss_estimator, entropy_coef=cfg.entropy_coef,
            is_weights=batch.is_weights, objective=self.objective, **agg, **distributed.head_group(head))
        if self.critic is None:
            value_loss = value_clipfrac = torch.zeros((), device=loss.device)
        else:
            values = self.values(hidden, batch.sequences, batch.attention_mask, batch.labels)
            value_loss, value_clipfrac = ops.value_loss(values, batch.old_values, batch.returns, batch.mask,
                                                        clip=cfg.value_clip, **agg)
            loss = loss + cfg.vf_coef * value_loss
        stats = {k: policy_stats[k] for k in MICRO_STATS if k in policy_stats}
        stats.update(value_loss=value_loss, value_clipfrac=value_clipfrac)
        return loss, {k: v.detach() for k, v in stats.items()}

    def _count_skips(self, skipped: bool) -> None:
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        limit = self.config.max_consecutive_skips
        if limit and self.consecutive_skips >= limit:
            raise TrainingDiverged(f"step {self.step_count + 1}: {limit} optimiser steps in a row had a non-finite "
                                   f"loss or gradient and were skipped; the run has diverged (lower lr?). The newest "
                                   f"checkpoint in {self.config.out!r} is from before it")

    # ------------------------------------------------------------------ state and checkpoints
    def state_dict(self) -> dict:
        """Everything a run needs to continue exactly: fp32 masters, optimiser, KL, RNG, prompt order."""
        return {
            "policy": dict(self.optimizer.named_masters(0)), "critic": dict(self.optimizer.named_masters(1)),
            "trainer": {**self._loop_state(), "optimizer": self.optimizer.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        for group, name in enumerate(("policy", "critic")):
            masters = dict(self.optimizer.named_masters(group))
            if set(masters) != set(state[name]):
                missing, extra = sorted(set(masters) - set(state[name])), sorted(set(state[name]) - set(masters))
                raise ConfigError(f"the {name} checkpoint does not match the model (did a setting change the "
                                  f"model?): missing {missing[:5]}, unexpected {extra[:5]}")
            with torch.no_grad():
                for key, master in masters.items():
                    master.copy_(state[name][key])
        self.optimizer.copy_masters_to_params()
        self.optimizer.load_state_dict(state["trainer"]["optimizer"])
        self._set_loop_state(state["trainer"])

    def _loop_state(self) -> dict:
        return {"step": self.step_count, "kl_coef": self.kl_controller.value, "rng": self._rng_state(),
                "prompt_order": getattr(self.prompt_source, "order", None)}

    def _set_loop_state(self, state: dict) -> None:
        self.kl_controller.value = state["kl_coef"]
        self.step_count = state["step"]
        self._set_rng_state(state["rng"])
        if state["prompt_order"] is not None:
            self.prompt_source.order = list(state["prompt_order"])

    def save(self) -> str:
        cfg = self.config
        if self.world.enabled:  # sharded: every rank writes its shards
            path = distributed.save_checkpoint(self.world, checkpoint_path(cfg.out, self.step_count), self.optimizer,
                                               {**self._loop_state(), **self.optimizer.schedule_state()})
            if self.world.is_main:
                prune_checkpoints(cfg.out, cfg.keep_checkpoints)
            return path
        return save_checkpoint(self.state_dict(), cfg.out, self.step_count, cfg.keep_checkpoints)

    def resume_from_latest(self) -> bool:
        """Restore the newest checkpoint of config.out that loads; False if there is none."""
        if self.world.enabled:
            found = list_checkpoints(self.config.out)
            if found:
                state = distributed.load_checkpoint(self.world, found[-1], self.optimizer)
                self.optimizer.load_schedule_state(state)
                self._set_loop_state(state)
            elif self.world.is_main:
                print(f"ppo_fast: no checkpoint in {self.config.out}, starting from step 0")
            return bool(found)
        path, state = load_newest(self.config.out)
        if path is None:
            print(f"ppo_fast: no checkpoint in {self.config.out}, starting from step 0")
            return False
        self.load_state_dict(state)
        return True

    @property
    def skipped_steps(self) -> int:
        return self.optimizer.skipped

    # ------------------------------------------------------------------ set-up details
    def _load_models(self, policy, tokenizer, reward_fn, reward_model, prompts) -> None:
        cfg = self.config
        if policy is None and cfg.policy is None:  # the embedded default
            from transformers import AutoModelForCausalLM

            self.tokenizer = tasks.DigitTokenizer()
            attn = "flash_attention_2" if models.flash_attn_available(self.device) else "sdpa"
            policy = AutoModelForCausalLM.from_config(tasks.tiny_policy_config(self.tokenizer), dtype=self.dtype,
                                                      attn_implementation=attn)
            if reward_model is None and reward_fn is None:  # else the caller's, on the task's prompts
                if cfg.reward_model:  # a reward model trained on the task (`ppo-fast rm`), in the task's token ids
                    reward_model = models.load_model(cfg.reward_model, "reward", self.dtype, self.device)
                else:
                    reward_fn = tasks.count_reward
            self.prompt_source = lambda n: tasks.count_prompts(n, self.data_generator)
        else:
            if policy is None:
                policy = models.load_model(_given(cfg.policy, "policy"), "causal-lm", self.dtype, self.device)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(_given(cfg.tokenizer or cfg.policy, "tokenizer"),
                                                          local_files_only=True)
            self.tokenizer = tokenizer
            if reward_model is None and reward_fn is None:
                if cfg.reward_model:
                    reward_model = models.load_model(cfg.reward_model, "reward", self.dtype, self.device)
                else:
                    reward_fn = load_function(_given(cfg.reward_fn, "reward_fn"))
            self.prompt_source = PromptCycle(prompts if prompts is not None else read_prompts(_given(cfg.prompts,
                                                                                                     "prompts")),
                                             self.data_generator)
        models.check_plain_lm_head(policy)
        self.policy = models.disable_dropout(policy).to(self.device).eval()  # old and new log-probs agree
        self.reward_model = None if reward_model is None else reward_model.to(self.device).eval().requires_grad_(False)
        self.reward_fn = reward_fn
        self.pad_token_id = pick_pad_token_id(self.tokenizer)
        critic_source = self.reward_model if cfg.critic == "reward" or (cfg.critic == "auto" and self.reward_model) \
            else self.policy
        self.critic = None if cfg.critic_free else models.ValueModel.from_model(
            critic_source, share=cfg.critic == "shared").to(self.device)
        self.cpu_threads = models.set_cpu_threads(cfg.cpu_threads, self.device, self.policy)
        self._make_reference()
        self._apply_memory_savers()
        for model in (self.policy, self.critic, self.reference, self.reward_model):
            if model is not None:
                self.world.shard(model)
        for model in (self.policy, self.reference):  # tensor_parallel: the LM heads split by vocabulary
            if model is not None:
                self.world.shard_lm_head(model, cfg.tensor_parallel_invariant)

    def _make_reference(self) -> None:
        """The reference: a frozen copy of the policy, or with LoRA the policy with its adapters
        disabled (self.reference None, self.peft_policy the wrapped policy)."""
        cfg = self.config
        self.peft_policy = None
        if cfg.lora_rank:
            self.peft_policy = models.add_lora(self.policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
            self.policy, self.reference = self.peft_policy.get_base_model(), None
        else:
            self.reference = models.frozen_copy(self.policy)

    def _apply_memory_savers(self) -> None:
        """Gradient checkpointing, offloading of the frozen models."""
        cfg = self.config
        if cfg.gradient_checkpointing:
            models.enable_gradient_checkpointing(self.policy)
            if self.critic is not None and cfg.critic != "shared":
                models.enable_gradient_checkpointing(self.critic.body)
        self.offloaded = [m for m in (self.reference, self.reward_model) if m is not None and cfg.offload]
        for model in self.offloaded:
            model.to("cpu")

    @contextlib.contextmanager
    def frozen_models_on_device(self):
        """With `offload`, the reference and reward model visit the device for the block."""
        for model in self.offloaded:
            model.to(self.device, non_blocking=True)
        try:
            yield
        finally:
            for model in self.offloaded:
                model.to("cpu")

    def tensor_parallel_params(self) -> list:
        """The trained parameters split over the tensor-parallel group (the policy's LM head shard)."""
        head = self.policy.get_output_embeddings()
        return [p for p in (head.weight, head.bias) if p is not None and p.requires_grad] \
            if getattr(head, "tp_group", None) is not None else []

    def named_trainable(self, which: str) -> list:
        """(name, parameter) pairs the optimiser updates, of the "policy" or the "critic"."""
        if which == "critic" and self.critic is None:
            return []
        module = self.policy if which == "policy" else self.critic.head if self.config.critic == "shared" else self.critic
        return [(name, p) for name, p in module.named_parameters() if p.requires_grad]

    def _timed(self, phase: str, into: dict, fn, *args):
        """fn(*args), recording time_<phase> (s) and on CUDA peak_memory_<phase>_gb (allocated)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        out = fn(*args)
        if cuda:
            torch.cuda.synchronize(self.device)
            into[f"peak_memory_{phase}_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        into[f"time_{phase}"] = time.perf_counter() - start
        return out

    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "sample": self.sample_generator.get_state(), "data": self.data_generator.get_state(),
                "shuffle": self.shuffle_generator.get_state(),
                "python": random.getstate(), "numpy": np.random.get_state()}

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.sample_generator.set_state(state["sample"])
        self.data_generator.set_state(state["data"])
        self.shuffle_generator.set_state(state["shuffle"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])


# ----------------------------------------------------------------------------- helpers
def padding_free(setting: str, device: torch.device) -> bool:
    """Whether the no-cache forwards pack sequences: "auto" where flash-attn's varlen kernel runs."""
    if setting == "off":
        return False
    if not models.packing_supported():
        if setting == "on":
            raise ConfigError("padding_free=on: this transformers cannot read packed sequences from position ids; "
                              "upgrade it (>= 5) or set padding_free=off")
        return False
    return setting == "on" or models.flash_attn_available(device)


def pick_pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token if it is not EOS, else its unk token; sampling pads finished
    rows with it and masks carry the real extent, but EOS must stay recognisable."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer: has no eos_token_id; generation needs one to stop")
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None)):
        if candidate is not None and candidate != eos:
            return candidate
    raise ConfigError("tokenizer: no pad token distinct from EOS (pad and unk are None or EOS); "
                      "add one, e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}), and resize the embeddings")


def _given(value, key: str):
    if value is None:
        raise ConfigError(f"{key}: not passed to PPOTrainer and not set in the config")
    return value
