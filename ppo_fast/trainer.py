"""PPO for language models on one device: rollout -> experience -> update, step after step.

    trainer = PPOTrainer(PPOConfig(...))          # or pass your own policy / tokenizer / reward
    trainer.train()                               # metrics.jsonl + config.yaml in config.out

One step:
  1. rollout     sample a response to each prompt with a KV cache (ppo_fast.rollout)
  2. experience  no grad: old and reference log-probs (fused linear -> log-prob, no logits),
                 values, scores; r_t = score on the last token - beta KL_t; GAE; whitening
  3. update      epochs x minibatches x micro-batches; the clipped policy loss (+ entropy
                 bonus, KL loss) and the clipped value loss, normalised by the minibatch's
                 token count so accumulated micro-batches equal one big batch; AdamW, clipping,
                 LR schedule; a non-finite loss or gradient skips the step (counted)

`config.ops = "reference"` runs the same loop on `ppo_fast.reference` (the baseline).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, fields

import torch

import ppo_fast
from ppo_fast import models, tasks
from ppo_fast.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from ppo_fast.config import ConfigError, PPOConfig, load_function
from ppo_fast.kl_controller import AdaptiveKLController, FixedKLController
from ppo_fast.rollout import left_pad, sample

IGNORE_INDEX = -100


@dataclass
class Experience:
    """One rollout batch: sequences [B, P + R] and per-response-token tensors [B, R]."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor  # bool, True on response tokens (EOS included)
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response.shape[1]

    @property
    def labels(self) -> torch.Tensor:
        return response_labels(self.response, self.mask)

    def select(self, rows: torch.Tensor) -> "Experience":
        return Experience(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def response_labels(response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Response ids with IGNORE_INDEX after EOS (the padding)."""
    return response.masked_fill(~mask, IGNORE_INDEX)


def rows_in_chunks(fn, size: int, *tensors):
    """fn over consecutive row chunks of `tensors`, outputs concatenated (a tensor or a tuple)."""
    outs = [fn(*(t[i:i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


class PPOTrainer:
    """Policy, reference, critic and reward on one device. Anything not passed in is loaded
    from the config (or, with `config.policy` unset, built for the embedded count task)."""

    def __init__(self, config: PPOConfig, *, policy=None, tokenizer=None, reward_fn=None, reward_model=None,
                 prompts: list[str] | None = None):
        given = (policy, tokenizer, reward_fn, reward_model, prompts)
        self.config = cfg = config.validate(check_sources=all(x is None for x in given))
        self.device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32}.get(cfg.dtype)
        self.dtype = dtype or getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        self.sample_generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        self.ops = ppo_fast.reference if cfg.ops == "reference" else ppo_fast.ops

        self.packed = padding_free(cfg.padding_free, self.device)
        self._load_task(policy, tokenizer, reward_fn, reward_model, prompts)
        self.pad_token_id = pick_pad_token_id(self.tokenizer)
        critic_source = self.reward_model if cfg.critic == "reward" or (cfg.critic == "auto" and self.reward_model) else self.policy
        self.critic = models.ValueModel.from_model(critic_source, share=cfg.critic == "shared").to(self.device)
        self._apply_memory_savers()
        self.kl_controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                              else FixedKLController(cfg.kl_coef))
        self._build_optimizer()
        self.step_count, self.skipped_steps = 0, 0

    # ------------------------------------------------------------------ set-up
    def _load_task(self, policy, tokenizer, reward_fn, reward_model, prompts) -> None:
        cfg = self.config
        if policy is None and cfg.policy is None:  # the embedded default
            from transformers import AutoModelForCausalLM

            self.tokenizer = tasks.DigitTokenizer()
            attn = "flash_attention_2" if models.flash_attn_available(self.device) else "sdpa"
            policy = AutoModelForCausalLM.from_config(tasks.tiny_policy_config(self.tokenizer), dtype=self.dtype,
                                                      attn_implementation=attn)
            reward_fn = tasks.count_reward
            self.prompt_source = lambda n: tasks.count_prompts(n, self.data_generator)
        else:
            if policy is None:
                policy = models.load_model(_given(cfg.policy, "policy"), "causal-lm", self.dtype, self.device)
            if tokenizer is None:
                from transformers import AutoTokenizer

                path = _given(cfg.tokenizer or cfg.policy, "tokenizer")
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.tokenizer = tokenizer
            if reward_model is None and reward_fn is None:
                if cfg.reward_model:
                    reward_model = models.load_model(cfg.reward_model, "reward", self.dtype, self.device)
                else:
                    reward_fn = load_function(_given(cfg.reward_fn, "reward_fn"))
            if prompts is None:
                prompts = read_prompts(_given(cfg.prompts, "prompts"))
            self.prompt_source = PromptCycle(prompts, self.data_generator)
        models.check_plain_lm_head(policy)
        self.policy = models.disable_dropout(policy).to(self.device).eval()  # old and new log-probs agree
        self.reward_model = None if reward_model is None else reward_model.to(self.device).eval().requires_grad_(False)
        self.reward_fn = reward_fn

    def _apply_memory_savers(self) -> None:
        """The reference (a frozen copy, or with LoRA the policy with adapters disabled),
        gradient checkpointing, offloading of the frozen models."""
        cfg = self.config
        self.peft_policy = None
        if cfg.lora_rank:
            self.peft_policy = models.add_lora(self.policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
            self.policy, self.reference = self.peft_policy.get_base_model(), None
        else:
            self.reference = models.frozen_copy(self.policy)
        if cfg.gradient_checkpointing:
            models.enable_gradient_checkpointing(self.policy)
            if cfg.critic != "shared":
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

    def named_trainable(self, which: str) -> list:
        """(name, parameter) pairs the optimiser updates, of the "policy" or the "critic"."""
        module = self.policy if which == "policy" else self.critic.head if self.config.critic == "shared" else self.critic
        return [(name, p) for name, p in module.named_parameters() if p.requires_grad]

    def named_masters(self, which: str) -> list:
        """(name, fp32 master) pairs: what the optimiser steps and checkpoints hold."""
        names = [name for name, _ in self.named_trainable(which)]
        return list(zip(names, self.master_groups[0 if which == "policy" else 1]))

    def master_pairs(self) -> list:
        """(parameter, fp32 master) for the parameters that have a separate master."""
        return [(p, m) for group, masters in zip(self.param_groups, self.master_groups)
                for p, m in zip(group, masters) if m is not p]

    def copy_masters_to_params(self) -> None:
        with torch.no_grad():
            for p, master in self.master_pairs():
                p.copy_(master)

    def _build_optimizer(self) -> None:
        """AdamW over fp32 master copies of bf16/fp16 parameters (an update of lr ~ 1e-6 would
        round away in bf16 weights); fp32 parameters are their own masters."""
        cfg = self.config
        self.param_groups = [[p for _, p in self.named_trainable(which)] for which in ("policy", "critic")]
        self.master_groups = [[p if p.dtype == torch.float32 else p.detach().float() for p in group]
                              for group in self.param_groups]
        self.optimizer = torch.optim.AdamW(
            [{"params": self.master_groups[0], "lr": cfg.lr}, {"params": self.master_groups[1], "lr": cfg.critic_lr}],
            weight_decay=cfg.weight_decay, fused=self.device.type == "cuda",
        )
        total = cfg.steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: lr_factor(i, cfg.warmup_steps, total, cfg.lr_schedule))

    # ------------------------------------------------------------------ 1. rollout
    def rollout(self):
        """(prompts, prompt ids [B, P], prompt mask, response [B, R], response mask)."""
        cfg = self.config
        prompts = self.prompt_source(cfg.rollout_batch_size)
        rows = [encode(self.tokenizer, p)[-cfg.max_prompt_length:] for p in prompts]
        prompt_ids, prompt_mask = left_pad(rows, self.pad_token_id, self.device)
        response, mask = sample(self.policy, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_token_id,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                generator=self.sample_generator)
        return prompts, prompt_ids, prompt_mask, response, mask

    # ------------------------------------------------------------------ 2. experience
    def head_logprobs(self, model, hidden, labels, return_entropy=False):
        """Log-probs of labels [B, R] (and entropy) from hidden states [B, R, H] and lm_head.weight."""
        head = model.get_output_embeddings()
        return self.ops.fused_linear_logprobs(hidden, head.weight, labels, bias=head.bias,
                                              temperature=self.config.temperature, return_entropy=return_entropy)

    def policy_outputs(self, sequences, attention_mask, labels, return_entropy=False):
        """(log-probs, entropy or None, values) [B, R]; a shared critic reuses the policy's hidden states."""
        prompt_length = sequences.shape[1] - labels.shape[1]
        hidden = models.response_hidden(self.policy, sequences, attention_mask, prompt_length, self.packed)
        out = self.head_logprobs(self.policy, hidden, labels, return_entropy)
        logp, entropy = out if return_entropy else (out, None)
        if self.config.critic == "shared":
            values = self.critic.values_from_hidden(hidden)
        else:
            values = self.critic(sequences, attention_mask, prompt_length, self.packed)
        return logp, entropy, values

    def reference_logprobs(self, sequences, attention_mask, labels):
        """Log-probs under the frozen reference (with LoRA: the policy with adapters disabled)."""
        prompt_length = sequences.shape[1] - labels.shape[1]
        lora = self.peft_policy is not None
        model = self.policy if lora else self.reference
        with self.peft_policy.disable_adapter() if lora else contextlib.nullcontext():
            hidden = models.response_hidden(model, sequences, attention_mask, prompt_length, self.packed)
        return self.head_logprobs(model, hidden, labels)

    @torch.no_grad()
    def score(self, prompts, sequences, attention_mask, response, mask) -> torch.Tensor:
        """Sequence scores [B] from the reward model or function, with the no-EOS penalty."""
        cfg = self.config
        ended = (response == self.tokenizer.eos_token_id).any(-1)
        if self.reward_model is not None:
            scores = rows_in_chunks(lambda s, a: models.reward_model_scores(self.reward_model, s, a, self.packed),
                                    cfg.micro_batch_size, sequences, attention_mask)
        else:
            lengths = (mask.sum(-1) - ended.long()).tolist()  # response tokens before EOS
            texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(response.tolist(), lengths)],
                                                skip_special_tokens=True)
            scores = torch.as_tensor(self.reward_fn(prompts, texts), dtype=torch.float32).to(self.device)
            if scores.shape != (len(prompts),) or not bool(torch.isfinite(scores).all()):
                raise ValueError(f"reward_fn: expected {len(prompts)} finite scores, got shape "
                                 f"{tuple(scores.shape)} with values {scores.tolist()[:8]}...")
        if cfg.missing_eos_penalty is not None:
            scores = scores + cfg.missing_eos_penalty * (~ended).float()
        return scores

    @torch.no_grad()
    def make_experience(self, prompts, prompt_ids, prompt_mask, response, mask):
        """Experience for the update, and its statistics."""
        cfg, ops = self.config, self.ops
        sequences = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        labels = response_labels(response, mask)
        micro = cfg.micro_batch_size
        old_logp, entropy, values = rows_in_chunks(lambda s, a, l: self.policy_outputs(s, a, l, return_entropy=True),
                                                   micro, sequences, attention_mask, labels)
        with self.frozen_models_on_device():
            ref_logp = rows_in_chunks(self.reference_logprobs, micro, sequences, attention_mask, labels)
            scores = self.score(prompts, sequences, attention_mask, response, mask)

        rewards = ops.compute_rewards(scores, old_logp, ref_logp, mask, kl_coef=self.kl_controller.value,
                                      estimator=cfg.kl_estimator)
        advantages, returns = ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        stats = experience_stats(scores, old_logp, ref_logp, entropy, values, advantages, returns, mask,
                                 prompt_mask, ops)
        if cfg.whiten_advantages:
            advantages = ops.masked_whiten(advantages, mask)
        experience = Experience(sequences, attention_mask, response, mask, old_logp, ref_logp, values,
                                advantages, returns)
        return experience, stats

    # ------------------------------------------------------------------ 3. update
    def micro_batch_loss(self, batch: Experience, num_tokens: float, num_seqs: float):
        """Loss of a micro-batch as its share of the minibatch mean, and its statistics."""
        cfg, ops = self.config, self.ops
        agg = dict(agg=cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
        logp, entropy, values = self.policy_outputs(batch.sequences, batch.attention_mask, batch.labels,
                                                    return_entropy=cfg.entropy_coef > 0)
        policy_loss, stats = ops.ppo_policy_loss(logp, batch.old_logp, batch.advantages, batch.mask,
                                                 clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                                 dual_clip=cfg.dual_clip, **agg)
        loss = policy_loss
        if entropy is not None:
            loss = loss - cfg.entropy_coef * ops.agg_loss(entropy, batch.mask, cfg.loss_agg,
                                                          num_tokens=num_tokens, num_seqs=num_seqs)
        if cfg.kl_loss_coef > 0:
            kl = ops.kl_penalty(logp, batch.ref_logp, estimator=cfg.kl_loss_estimator)
            loss = loss + cfg.kl_loss_coef * ops.agg_loss(kl, batch.mask, cfg.loss_agg, num_tokens=num_tokens,
                                                          num_seqs=num_seqs)
        value_loss, value_clipfrac = ops.value_loss(values, batch.old_values, batch.returns, batch.mask,
                                                    clip=cfg.value_clip, **agg)
        loss = loss + cfg.vf_coef * value_loss
        stats = {**stats, "policy_loss": policy_loss, "value_loss": value_loss, "value_clipfrac": value_clipfrac}
        return loss, {k: v.detach() for k, v in stats.items()}

    def optimizer_step(self, loss: torch.Tensor) -> dict:
        """Clip, then apply the step unless the loss or a gradient norm is not finite."""
        for p, master in self.master_pairs():  # gradients to the fp32 masters
            master.grad, p.grad = (None if p.grad is None else p.grad.float()), None
        max_norm = self.config.max_grad_norm or float("inf")
        norms = [torch.nn.utils.clip_grad_norm_(group, max_norm) for group in self.master_groups]
        finite = bool(torch.isfinite(torch.stack([loss.detach(), *norms])).all())
        if finite:
            self.optimizer.step()
            self.copy_masters_to_params()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return {"grad_norm": norms[0], "critic_grad_norm": norms[1]}

    def update(self, experience: Experience) -> dict:
        self.policy.train(), self.critic.train()  # dropout is off: only gradient checkpointing reads this
        try:
            return self._update(experience)
        finally:
            self.policy.eval(), self.critic.eval()

    def _update(self, experience: Experience) -> dict:
        cfg = self.config
        totals, weight = defaultdict(float), 0.0
        B = experience.mask.shape[0]
        for _ in range(cfg.ppo_epochs):
            for rows in torch.randperm(B, generator=self.data_generator).split(cfg.mini_batch_size):
                mini = experience.select(rows.to(self.device))
                token_counts = mini.mask.sum(-1)
                num_tokens = max(int(token_counts.sum()), 1)
                num_seqs = max(int((token_counts > 0).sum()), 1)
                loss_sum = 0.0
                for start in range(0, len(rows), cfg.micro_batch_size):
                    micro = mini.select(slice(start, start + cfg.micro_batch_size))
                    loss, stats = self.micro_batch_loss(micro, num_tokens, num_seqs)
                    loss.backward()
                    loss_sum = loss_sum + loss.detach()
                    share = float(micro.mask.sum()) / num_tokens
                    for key, value in stats.items():  # losses are shares already; token-mean stats are not
                        totals[key] += value if key.endswith("loss") else value * share
                for key, value in self.optimizer_step(loss_sum).items():
                    totals[key] += value
                weight += 1
        return {key: float(value) / weight for key, value in totals.items()}

    # ------------------------------------------------------------------ the loop
    def step(self) -> dict:
        """One PPO step; returns its metrics."""
        phases = {}
        prompts, prompt_ids, prompt_mask, response, mask = self._timed("rollout", phases, self.rollout)
        experience, stats = self._timed("experience", phases, self.make_experience, prompts, prompt_ids, prompt_mask,
                                        response, mask)
        update_stats = self._timed("update", phases, self.update, experience)
        self.kl_controller.update(stats["kl"], self.config.rollout_batch_size)
        self.step_count += 1
        tokens = int(prompt_mask.sum()) + int(mask.sum())
        step_time = sum(v for k, v in phases.items() if k.startswith("time_"))
        peaks = [v for k, v in phases.items() if k.startswith("peak_memory_")]
        return {
            "step": self.step_count, **stats, **update_stats,
            "kl_coef": self.kl_controller.value, "lr": self.scheduler.get_last_lr()[0],
            "skipped_steps": self.skipped_steps, "tokens": tokens, "tokens_per_s": tokens / step_time, **phases,
            "peak_memory_gb": max(peaks) if peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }

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

    def train(self, resume: bool = False) -> list[dict]:
        """Run to config.steps, appending each step's metrics to OUT/metrics.jsonl (and
        TensorBoard), checkpointing every `save_every` steps and at the end. `resume` first
        restores the newest complete checkpoint in OUT."""
        from tqdm.auto import tqdm

        cfg = self.config
        if not resume and list_checkpoints(cfg.out):
            raise ConfigError(f"out: {cfg.out!r} holds checkpoints of an earlier run; resume it (--resume) "
                              f"or choose another folder")
        os.makedirs(cfg.out, exist_ok=True)
        cfg.save(os.path.join(cfg.out, "config.yaml"))
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if resume and self.resume_from_latest():
            truncate_metrics(metrics_path, self.step_count)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run
        writer = tensorboard_writer(cfg.out, self.step_count) if cfg.tensorboard else None
        history = []
        bar = tqdm(range(self.step_count, cfg.steps), desc="ppo", disable=not cfg.progress, dynamic_ncols=True)
        with open(metrics_path, "a") as log:
            for _ in bar:
                metrics = self.step()
                history.append(metrics)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(f"ppo/{key}", value, self.step_count)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.3f}",
                                ent=f"{metrics['entropy']:.2f}", clip=f"{metrics['clipfrac']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                if cfg.save_every and self.step_count % cfg.save_every == 0 and self.step_count < cfg.steps:
                    save_checkpoint(self, cfg.out, cfg.keep_checkpoints)
        if writer is not None:
            writer.close()
        if not os.path.isdir(checkpoint_path(cfg.out, self.step_count)):
            save_checkpoint(self, cfg.out, cfg.keep_checkpoints)
        return history

    def resume_from_latest(self) -> bool:
        """Restore the newest complete checkpoint of config.out; False if there is none."""
        found = list_checkpoints(self.config.out)
        if not found:
            print(f"ppo_fast: no checkpoint in {self.config.out}, starting from step 0")
            return False
        load_checkpoint(self, found[-1])
        return True


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def experience_stats(scores, old_logp, ref_logp, entropy, values, advantages, returns, mask, prompt_mask, ops) -> dict:
    """Per-step statistics of a rollout batch (advantages before whitening)."""
    m = mask.float()
    kl_tokens = (old_logp - ref_logp) * m  # k1 per token
    kl_seq = kl_tokens.sum(-1)
    adv, ret = advantages[mask], returns[mask]
    return {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": float(kl_seq.mean()), "kl_per_token": float(ops.masked_mean(kl_tokens, mask)),
        "entropy": float(ops.masked_mean(entropy, mask)),
        "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
        "return_mean": float(ret.mean()), "return_std": float(ret.std()),
        "value_mean": float(ops.masked_mean(values, mask)),
        "response_length": float(m.sum(-1).mean()), "prompt_length": float(prompt_mask.float().sum(-1).mean()),
    }


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


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the lines of steps after `last_step` (logged after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def tensorboard_writer(out: str, step: int):
    """A SummaryWriter on OUT that drops events after `step` (from a run that went past its
    last checkpoint), or None with a warning if tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("ppo_fast: tensorboard is not installed; metrics go to metrics.jsonl only", RuntimeWarning)
        return None
    return SummaryWriter(out, purge_step=step + 1 if step else None)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` optimiser steps, then constant / linear / cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


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


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise ValueError(f"prompt {text!r} encodes to no tokens")
    return ids


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl file (a "prompt" field per line)."""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in lines] if path.endswith(".jsonl") else lines
    if not prompts:
        raise ConfigError(f"prompts: {path!r} holds no prompts")
    return prompts


class PromptCycle:
    """Draws batches from a prompt list, reshuffled (with the run's generator) each pass."""

    def __init__(self, prompts: list[str], generator: torch.Generator):
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        self.prompts, self.generator, self.order = list(prompts), generator, []

    def __call__(self, n: int) -> list[str]:
        batch = []
        while len(batch) < n:
            if not self.order:
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            batch.append(self.prompts[self.order.pop()])
        return batch
