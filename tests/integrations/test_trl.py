"""ppo_fast.integrations.trl against TRL's own code (TRL 1.16, installed by make peers with accelerate and
datasets): the per-token helpers, the fused LM head of TRL's trainers (ChunkedLogProbFunction),
GRPOTrainer's loss through fused_linear_ppo_loss, and patch() inside TRL's own GRPOTrainer."""
import math
import os
import warnings

import pytest
import torch
from peers import load, trl_utils
from support import DEVICE, assert_close_f64, backends_for, on_backend, randn, tiny_tokenizer

from ppo_fast.integrations import UnsupportedOption, grpo_loss_types
from ppo_fast.integrations import trl as pf_trl

OP = "logprobs_from_logits"
V = 1013
trl = pytest.importorskip("trl", reason="TRL is not installed (make peers)")
pytest.importorskip("datasets", reason="TRL's trainers need datasets (make peers)")
TRL_COMPUTE_LOSS = trl.GRPOTrainer._compute_loss  # TRL's own, whatever a test patches later
# TRL 1.16's own trainers still call transformers' old gradient-checkpointing names (not ppo_fast's code)
pytestmark = pytest.mark.filterwarnings(r"ignore:`\w*gradient_checkpointing\w*` is deprecated:FutureWarning")


@pytest.fixture
def patched():
    """patch() for one test; TRL's own functions are put back after it (the other tests' oracle)."""
    yield pf_trl.patch
    pf_trl.unpatch()


def inputs(dtype=torch.float32, seed=0):
    logits = randn(3, 9, V, seed=seed, scale=3.0).to(dtype)
    return logits, torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ----------------------------------------------------------------------------- per-token helpers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(backend, dtype, temperature):
    logits, index = inputs(dtype)
    row_mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    got = pf_trl.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
    want = trl_utils().selective_log_softmax(logits.double(), index, temperature=temperature, row_mask=row_mask)
    assert got.dtype == dtype  # TRL's convention: the logits' dtype
    assert_close_f64(got, want, "logp", magnitude=10)
    logits.requires_grad_()
    (grad,) = torch.autograd.grad(pf_trl.selective_log_softmax(logits, index).float().sum(), logits)
    x = logits.detach().double().requires_grad_()
    (want_grad,) = torch.autograd.grad(trl_utils().selective_log_softmax(x, index).sum(), x)
    assert_close_f64(grad, want_grad, "grad")


@pytest.mark.parametrize("k", [1, 8])
def test_k_ids_per_position_and_float64_match_trl(backend, k):
    """K ids per position (one kernel pass: the first id's log-prob gives the lse, the others a
    gather), and float64 logits computed in float64, as TRL's own helper gives them."""
    logits, _ = inputs(torch.float32, seed=3)
    index = torch.randint(0, V, (3, 9, k), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    x = logits.clone().requires_grad_()
    got = pf_trl.selective_log_softmax(x, index, temperature=0.8)
    (grad,) = torch.autograd.grad(got.sum(), x)
    y = logits.double().requires_grad_()
    want = trl_utils().selective_log_softmax(y, index, temperature=0.8)
    (want_grad,) = torch.autograd.grad(want.sum(), y)
    assert got.shape == (3, 9, k)
    assert_close_f64(got, want, "logp", magnitude=10)
    assert_close_f64(grad, want_grad, "grad")
    got64 = pf_trl.selective_log_softmax(logits.double(), index)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, trl_utils().selective_log_softmax(logits.double(), index))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits_matches_trl(backend, dtype):
    logits, _ = inputs(dtype, seed=2)
    got = pf_trl.entropy_from_logits(logits)
    assert got.dtype == dtype
    assert_close_f64(got, trl_utils().entropy_from_logits(logits.double()), "entropy")
    logp, entropy = pf_trl.selective_log_softmax_and_entropy(logits, inputs(dtype, seed=2)[1], temperature=0.9)
    want_logp, want_entropy = trl_utils().selective_log_softmax_and_entropy(logits.double(), inputs(dtype, seed=2)[1],
                                                                            temperature=0.9)
    assert_close_f64(logp, want_logp, "logp", magnitude=10)
    assert_close_f64(entropy, want_entropy, "entropy")


def test_half_precision_is_closer_to_float64_than_trls_own():
    """TRL's own unit tests compare half-precision results with half-precision log_softmax, exactly:
    TRL's half fallback passes by construction. ppo_fast accumulates in fp32, so its bf16 entropy and
    log-probs are closer to the float64 truth than TRL's (README)."""
    logits, index = inputs(torch.bfloat16, seed=5)
    truth_entropy = trl_utils().entropy_from_logits(logits.double())
    truth_logp = trl_utils().selective_log_softmax(logits.double(), index)
    ours = (pf_trl.entropy_from_logits(logits).double() - truth_entropy).abs().max()
    theirs = (trl_utils().entropy_from_logits(logits).double() - truth_entropy).abs().max()
    assert ours <= theirs
    ours = (pf_trl.selective_log_softmax(logits, index).double() - truth_logp).abs().max()
    theirs = (trl_utils().selective_log_softmax(logits, index).double() - truth_logp).abs().max()
    assert ours <= theirs


# ----------------------------------------------------------------------------- the fused LM head
def trl_chunked():
    return load("trl.kernels.chunked_logprob").ChunkedLogProbFunction


@pytest.mark.op("fused_linear_logprobs")
@pytest.mark.parametrize("softcap, logit_scale", [(None, 1.0), (30.0, 1.0), (None, 0.25)])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"), pf_trl.OPTIONAL_OUTPUTS])
def test_chunked_logprob_function_matches_trls_own(backend, softcap, logit_scale, outputs):
    """The stand-in against trl.kernels.ChunkedLogProbFunction: every output, softcap, logit scale,
    bias; values and gradients to hidden, weight and bias."""
    N, H = 23, 16
    hidden, weight, bias = randn(N, H, seed=6), randn(V, H, seed=7, scale=0.4), randn(V, seed=8)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    args = (targets, 0.9, 256, softcap, logit_scale, outputs)

    def run(fn):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = fn(h, w, b, *args)
        diff = [o for o in out[:2] if o is not None]
        grads = torch.autograd.grad(sum(o.sum() * (i + 1) for i, o in enumerate(diff)), (h, w, b))
        return out, grads

    (got, got_grads), (want, want_grads) = run(pf_trl.ChunkedLogProbFunction.apply), run(trl_chunked().apply)
    for name, a, b in zip(("log_probs",) + pf_trl.OPTIONAL_OUTPUTS, got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == b.dtype, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_chunked_logprob_function_refuses_what_it_cannot_follow():
    hidden, weight = randn(3, 4, seed=1), randn(7, 4, seed=2)
    targets = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(UnsupportedOption, match=r"outputs \['top5'\]"):
        pf_trl.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, None, 1.0, ("log_probs", "top5"))
    with pytest.raises(UnsupportedOption, match="logit_scale=0.0"):
        pf_trl.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, None, 0.0)


# ----------------------------------------------------------------------------- GRPOTrainer
def tiny_grpo_trainer(tmp_path, steps=3, **config):
    """TRL's GRPOTrainer on a 2-layer Llama, in fp32 unless bf16=True is passed (TRL's default is bf16
    autocast, whose rounding both sides share only to bf16 precision)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=1))
    model_dir = tmp_path / "model"  # a path: with beta > 0 TRL builds the reference model from it
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                          learning_rate=1e-3, save_strategy="no", disable_tqdm=True, **{"bf16": False, **config})
    return trl.GRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **kw: [float(c.count("1")) for c in completions],
                           args=args, train_dataset=Dataset.from_dict({"prompt": ["123", "456", "789", "012"] * 4}),
                           processing_class=tok)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_patched_grpo_trainer_runs_on_ppo_fast_with_the_same_losses(tmp_path, patched):
    """TRL's own GRPOTrainer a few steps with and without patch(): the patched run computes its
    log-probs through ppo_fast (counted) and logs the same losses (fp32)."""
    plain = tiny_grpo_trainer(tmp_path / "plain", beta=0.04, use_bias_correction_kl=False)
    plain.train()
    replaced = patched()
    assert "trl.trainer.utils._ChunkedLogProbFunction" in replaced
    calls = pf_trl.CALLS["ChunkedLogProbFunction"]
    fast = tiny_grpo_trainer(tmp_path / "fast", beta=0.04, use_bias_correction_kl=False)
    fast.train()
    assert pf_trl.CALLS["ChunkedLogProbFunction"] > calls
    assert losses(fast) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)


def test_patch_reports_what_it_replaced_and_is_idempotent(patched, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="ppo_fast.integrations.trl"):
        replaced = patched(loss=True)
    assert {"trl.trainer.utils._ChunkedLogProbFunction", "trl.trainer.utils.selective_log_softmax",
            "trl.GRPOTrainer._compute_loss"} <= set(replaced)
    assert all(f"ppo_fast replaced {name}" in caplog.text for name in replaced)
    assert trl_utils()._ChunkedLogProbFunction is pf_trl.ChunkedLogProbFunction
    assert patched(loss=True) == []  # nothing left to replace
    pf_trl.unpatch()
    assert trl.GRPOTrainer._compute_loss is TRL_COMPUTE_LOSS
    assert trl_utils().selective_log_softmax is not pf_trl.selective_log_softmax


def test_a_trainer_that_calls_none_of_it_gets_a_warning(tmp_path, patched):
    """A TRL whose trainers compute log-probs elsewhere (here: the stand-in put back in TRL's module
    after patch) is noticed after the first training step, not silently slow."""
    patched()
    utils = trl_utils()
    utils._ChunkedLogProbFunction = pf_trl._ORIGINALS[(utils, "_ChunkedLogProbFunction")]  # as a TRL that moved
    trainer = tiny_grpo_trainer(tmp_path, steps=1)
    with pytest.warns(RuntimeWarning, match="GRPOTrainer finished a training step without calling any"):
        trainer.train()


def test_every_replacement_has_the_signature_of_what_it_replaced(patched):
    """Positional parameters included: trl.kernels.selective_log_softmax_and_entropy takes temperature
    third, trl.trainer.utils's takes entropy_requires_grad third; each gets its own."""
    import inspect

    patched(loss=True)
    for (owner, attr), theirs in pf_trl._ORIGINALS.items():
        if attr == "training_step":
            continue
        ours = getattr(owner, attr)
        if attr == "_ChunkedLogProbFunction":  # an autograd Function: apply's parameters are forward's, less ctx
            ours, theirs = ours.apply, theirs.forward
        params = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values() if p.name != "ctx"]
        assert [(p.name, p.default) for p in inspect.signature(ours).parameters.values()] == params, attr
    kernels = load("trl.kernels")
    assert kernels.selective_log_softmax_and_entropy is pf_trl.kernels_selective_log_softmax_and_entropy
    logits, index = randn(3, 5, 11, seed=30), torch.randint(0, 11, (3, 5), device=DEVICE)
    got = kernels.selective_log_softmax_and_entropy(logits, index, 0.7)  # a positional temperature
    want = pf_trl._ORIGINALS[(kernels, "selective_log_softmax_and_entropy")](logits, index, 0.7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_plain_transformers_trainer_gets_no_warning(tmp_path, patched):
    """The watch speaks only to TRL's trainers: a plain transformers Trainer calls none of ppo_fast's
    replacements, rightly, and is not warned."""
    import warnings

    from transformers import Trainer, TrainingArguments

    patched()
    model = torch.nn.Sequential(torch.nn.Linear(4, 1))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            return {"loss": ((self.net(x).squeeze(-1) - labels) ** 2).mean()}

    data = [{"x": torch.randn(4), "labels": torch.tensor(1.0)} for _ in range(4)]
    trainer = Trainer(model=Wrapped(), args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                                              use_cpu=True, per_device_train_batch_size=2,
                                                              save_strategy="no", disable_tqdm=True), train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()


LOSS_CASES = [(t, level) for t in grpo_loss_types.LOSS_TYPES for level in ("token", "sequence")]


def grpo_inputs(trainer, level, with_is, seed=0):
    """A micro-batch as GRPOTrainer._prepare_inputs leaves it: left-padded prompts, ragged completions,
    old and reference log-probs near the policy's, advantages, the vLLM importance ratios."""
    g = torch.Generator().manual_seed(seed)
    B, P, L = 4, 3, 7
    prompt_ids, completion_ids = torch.randint(3, 24, (B, P), generator=g), torch.randint(1, 24, (B, L), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_mask = (torch.arange(L)[None] < torch.tensor([[7], [4], [1], [5]])).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), L)
    out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
           "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
           "old_per_token_logps": logps + 0.3 * torch.randn(B, L, generator=g),
           "ref_per_token_logps": logps + 0.2 * torch.randn(B, L, generator=g),
           "num_items_in_batch": completion_mask.sum() * 3}
    if with_is:
        ratio = torch.rand((B, L) if level == "token" else (B, 1), generator=g) + 0.5
        # 1 at padding, as TRL makes them (exp of a masked log-ratio difference)
        out["importance_sampling_ratio"] = torch.where(completion_mask.bool(), ratio, 1.0) if level == "token" else ratio
    return out


def loss_door_results(trainer, batch):
    """(loss, parameter gradients, logged metrics) of TRL's _compute_loss, then of grpo_compute_loss."""
    model = trainer.model.train()
    results = []
    for compute in (TRL_COMPUTE_LOSS, pf_trl.grpo_compute_loss):
        trainer._metrics["train"].clear()
        model.zero_grad()
        loss = compute(trainer, model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    return results


@pytest.mark.op("fused_linear_ppo_loss")
@pytest.mark.parametrize("loss_type, level", LOSS_CASES)
@pytest.mark.parametrize("with_is, bias_correction", [(False, False), (True, False), (False, True)])
def test_grpo_loss_door_matches_trls_own_compute_loss(tmp_path, backend, loss_type, level, with_is, bias_correction):
    """grpo_compute_loss against GRPOTrainer's own _compute_loss on the same micro-batch (fp32): the
    loss, the gradients of every parameter, and every metric it logs; with TRL's default
    use_bias_correction_kl (the KL times the importance ratio) too."""
    extra = dict(epsilon_high=5.0) if loss_type == "cispo" else dict(delta=2.0) if loss_type == "dapo" else {}
    trainer = tiny_grpo_trainer(tmp_path, steps=1, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                                use_bias_correction_kl=bias_correction, **extra)
    trainer.current_gradient_accumulation_steps = 2
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = with_is
    (want, want_grads, want_metrics), (got, got_grads, got_metrics) = loss_door_results(
        trainer, grpo_inputs(trainer, level, with_is))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert got_metrics.keys() == want_metrics.keys()  # every metric TRL's _compute_loss logs
    for key in want_metrics:
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.op("fused_linear_ppo_loss")
@pytest.mark.parametrize("loss_type, extra", [("dapo", dict(delta=1.1)), ("grpo", dict(delta=1.25)),
                                              ("cispo", dict(epsilon_high=0.8))])
def test_grpo_loss_door_follows_delta_below_the_range_and_a_cispo_cap_below_one(tmp_path, backend, loss_type, extra):
    """TRL's two-sided clipping with delta < 1 + epsilon_high (objective clip_delta, the generic path)
    and a CISPO cap below 1 (TRL's own default for cispo): loss and gradients equal to TRL's. (TRL's
    region clip metric reads the ratio after delta's clamp, Liger's before; ppo_fast's is Liger's.)"""
    trainer = tiny_grpo_trainer(tmp_path, steps=1, loss_type=loss_type, beta=0.0, **extra)
    trainer.current_gradient_accumulation_steps = 1
    (want, want_grads, _), (got, got_grads, _) = loss_door_results(trainer, grpo_inputs(trainer, "token", False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_loss_door_under_trls_default_bf16_autocast(tmp_path):
    """TRL's default (bf16 autocast): the same loss, and gradients within bf16 rounding of TRL's."""
    trainer = tiny_grpo_trainer(tmp_path, steps=1, bf16=True, beta=0.04, use_bias_correction_kl=False)
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.accelerator.mixed_precision == "bf16"
    (want, want_grads, _), (got, got_grads, _) = loss_door_results(trainer, grpo_inputs(trainer, "token", False))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    for name in want_grads:
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=2e-2 * scale + 1e-6, msg=name)


def grads_error(grads, exact):
    """Relative error of a parameter-gradient dict against another, over all parameters."""
    num = sum(((grads[n].double() - exact[n].double()) ** 2).sum() for n in exact)
    return (num / sum((exact[n].double() ** 2).sum() for n in exact)).sqrt().item()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_bf16_gradients_are_no_further_from_exact_than_trls_own(tmp_path, loss_type):
    """TRL's default bf16 autocast, fp32 master parameters: the loss door's parameter gradients are no
    further from the fp32 computation (TRL's own fp32 run of the same model, ~1e-7 from exact) than
    TRL's own bf16 gradients are (the head's GEMMs in bf16 on both sides; ppo_fast accumulates the
    fp32 masters' gradients in fp32 and never rounds them through bf16)."""
    config = dict(steps=1, beta=0.04, use_bias_correction_kl=False, loss_type=loss_type)
    exact_trainer = tiny_grpo_trainer(tmp_path / "fp32", **config)
    bf16_trainer = tiny_grpo_trainer(tmp_path / "bf16", bf16=True, **config)
    for trainer in (exact_trainer, bf16_trainer):
        trainer.current_gradient_accumulation_steps = 1
    batch = grpo_inputs(exact_trainer, "token", False)
    (_, exact, _), _ = loss_door_results(exact_trainer, batch)
    (_, theirs, _), (_, ours, _) = loss_door_results(bf16_trainer, batch)
    assert exact.keys() == theirs.keys() == ours.keys()
    assert all(g.dtype == torch.float32 for g in ours.values())
    assert grads_error(ours, exact) <= grads_error(theirs, exact) * 1.05, (grads_error(ours, exact),
                                                                            grads_error(theirs, exact))


# The kernel backends that round to bf16 to nearest: Triton's interpreter truncates (compiled Triton
# rounds to nearest), and the torch backend is the plain reference (a user's code under autocast,
# whose hidden-state gradient autocast rounds to bf16).
ROUNDING_BACKENDS = [b for b in backends_for("fused_linear_logprobs")
                     if b in ("cpp", "cuda", "auto") or (b == "triton" and DEVICE.type == "cuda")]


@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
def test_the_fused_head_under_autocast_is_no_further_from_exact_than_trls_kernel(backend):
    """ChunkedLogProbFunction under bf16 autocast with fp32 hidden states and weight (TRL's setting):
    gradients to both no further from float64 than TRL's own kernel's."""
    N, H = 64, 16
    hidden, weight = randn(N, H, seed=16), randn(V, H, seed=17, scale=0.4)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(18)).to(DEVICE)
    up = randn(N, seed=19)

    def grads(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=h.dtype != torch.float64):
            logp, entropy = fn(h, w, None, targets, 1.0, 256, None, 1.0, ("log_probs", "entropy"))[:2]
        return torch.autograd.grad((logp * up.to(logp.dtype)).sum() + entropy.sum(), (h, w))

    exact = grads(lambda h, w, *a: _float64_head(h, w, *a), hidden.double(), weight.double())
    with on_backend(backend):
        ours = grads(pf_trl.ChunkedLogProbFunction.apply, hidden, weight)
    theirs = grads(trl_chunked().apply, hidden, weight)
    for name, a, b, e in zip(("hidden", "weight"), ours, theirs, exact):
        err = lambda g: ((g.double() - e).norm() / e.norm()).item()  # noqa: E731
        assert a.dtype == torch.float32 and err(a) <= err(b) * 1.01 + 1e-7, (name, err(a), err(b))


def _float64_head(hidden, weight, bias, targets, temperature, *_):
    logits = (hidden @ weight.T / temperature).log_softmax(-1)
    return logits.gather(-1, targets[:, None]).squeeze(-1), -(logits.exp() * logits).sum(-1)


TOKEN_VALUE_CASES = {
    "entropy-mask": dict(top_entropy_quantile=0.5),
    "off-policy-mask": dict(off_policy_mask_threshold=0.0),
    "entropy-bonus": dict(entropy_coef=0.05),
    "adaptive-entropy": dict(use_adaptive_entropy=True, entropy_coef=0.02, entropy_target=5.0),
    "all-three": dict(top_entropy_quantile=0.7, off_policy_mask_threshold=0.0, entropy_coef=0.05),
}
ENTROPY_STATE = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


@pytest.mark.op("fused_linear_ppo_loss")
@pytest.mark.parametrize("case", TOKEN_VALUE_CASES)
@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence"), ("cispo", "token")])
def test_grpo_loss_door_follows_trls_token_masks_and_entropy_bonus(tmp_path, backend, case, loss_type, level):
    """TRL's options that read the batch's current log-probs or entropies — top_entropy_quantile < 1
    (its high-entropy token mask), off_policy_mask_threshold (its off-policy sequence mask, from the
    sampler's log-probs), the entropy bonus (static and adaptive) — against TRL's own _compute_loss
    on the same micro-batch, with the vLLM importance ratios and TRL's default bias-corrected KL:
    loss, every parameter gradient, every metric (policy_loss and entropy_coef among them), and the
    adaptive controller's state after the step (both sides start from the same state)."""
    extra = dict(epsilon_high=5.0) if loss_type == "cispo" else {}
    trainer = tiny_grpo_trainer(tmp_path, steps=1, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                                **extra, **TOKEN_VALUE_CASES[case])
    trainer.current_gradient_accumulation_steps = 2
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    batch = grpo_inputs(trainer, level, True, seed=3)
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] + 0.1
    if case == "adaptive-entropy":
        trainer._last_world_entropy = 1.0  # below the target: the bonus applies this step
    start = {k: getattr(trainer, k) for k in ENTROPY_STATE}
    model = trainer.model.train()
    results = []
    for compute in (TRL_COMPUTE_LOSS, pf_trl.grpo_compute_loss):
        for k, v in start.items():
            setattr(trainer, k, v)
        trainer._metrics["train"].clear()
        model.zero_grad()
        loss = compute(trainer, model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        {k: v[-1] for k, v in trainer._metrics["train"].items()},
                        {k: getattr(trainer, k) for k in ENTROPY_STATE}))
    (want, want_grads, want_metrics, want_state), (got, got_grads, got_metrics, got_state) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6, nan_ok=True), key
    assert got_state.keys() == want_state.keys()
    for key, want_value in want_state.items():  # floats, or the window's stats tensor (None after a step)
        got_value = got_state[key]
        if want_value is None or got_value is None:
            assert got_value is None and want_value is None, key
        elif isinstance(want_value, torch.Tensor):
            torch.testing.assert_close(got_value, want_value, rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert got_value == pytest.approx(want_value, rel=1e-6), key
    if case == "adaptive-entropy":
        assert got_state["entropy_coef"] != start["entropy_coef"]  # the controller moved


def test_the_token_masks_drop_something_in_those_cases(tmp_path):
    """The cases above are not vacuous: on that batch TRL's off-policy mask drops a sequence and its
    entropy mask a token."""
    trainer = tiny_grpo_trainer(tmp_path, steps=1, top_entropy_quantile=0.5, off_policy_mask_threshold=0.0)
    batch = grpo_inputs(trainer, "token", True, seed=3)
    B, L = batch["completion_ids"].shape
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), L, compute_entropy=True)
    mask = batch["completion_mask"]
    kept = trainer.get_off_policy_mask(batch["advantages"][:, None], logps, batch["old_per_token_logps"] + 0.1, mask, 0.0)
    assert 0 < kept.sum() < B
    assert 0 < trainer.get_high_entropy_mask(entropies, mask, 0.5).sum() < mask.sum()


def test_grpo_loss_door_refuses_what_it_cannot_follow(tmp_path):
    trainer = tiny_grpo_trainer(tmp_path, steps=1, loss_type="vespo", top_entropy_quantile=0.5)
    batch = grpo_inputs(trainer, "token", False)
    with pytest.raises(UnsupportedOption, match="top_entropy_quantile / off_policy_mask_threshold with loss_type='vespo'"):
        pf_trl.grpo_compute_loss(trainer, trainer.model, batch)


def test_a_30_step_bf16_run_with_the_patch_matches_trls_own(tmp_path, patched):
    """TRL's default bf16 (autocast over fp32 masters), 30 GRPO steps with beta > 0 and TRL's default
    bias-corrected KL: with patch(loss=True) the run samples the same completions at every step as
    TRL's own run (the same rewards: the policies never drift apart), and logs the same losses to
    bf16 rounding — as long as two runs of TRL's own agree (identical here: CPU, one seed)."""
    def run(name, loss):
        if loss:
            patched(loss=True)
        trainer = tiny_grpo_trainer(tmp_path / name, steps=30, bf16=True, beta=0.04, loss_type="dapo")
        trainer.train()
        if loss:
            pf_trl.unpatch()
        history = [h for h in trainer.state.log_history if "loss" in h]
        return [h["reward"] for h in history], [h["loss"] for h in history]

    trl_a, trl_b = run("trl_a", False), run("trl_b", False)
    assert trl_a == trl_b  # TRL's own two runs: identical
    calls = pf_trl.CALLS["grpo_compute_loss"]
    rewards, run_losses = run("ppo_fast", True)
    assert pf_trl.CALLS["grpo_compute_loss"] > calls
    assert len(rewards) == 30 and rewards == trl_a[0]
    assert run_losses == pytest.approx(trl_a[1], rel=1e-2, abs=1e-3)


def test_patched_loss_trains_like_trl(tmp_path, patched):
    """patch(loss=True): GRPOTrainer's loss through fused_linear_ppo_loss, a few real training steps,
    the same losses as TRL's own."""
    plain = tiny_grpo_trainer(tmp_path / "plain", beta=0.04, loss_type="dapo", use_bias_correction_kl=False)
    plain.train()
    patched(loss=True)
    calls = pf_trl.CALLS["grpo_compute_loss"]
    fast = tiny_grpo_trainer(tmp_path / "fast", beta=0.04, loss_type="dapo", use_bias_correction_kl=False)
    fast.train()
    assert pf_trl.CALLS["grpo_compute_loss"] > calls
    assert losses(fast) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- TRL's own unit tests
TRL_TESTS = os.environ.get("PPO_FAST_TRL_TESTS")  # a checkout's tests/test_utils.py (not in TRL's wheel or sdist)


@pytest.mark.skipif(not TRL_TESTS, reason="TRL's own tests/test_utils.py is not shipped in its wheel or sdist; set "
                                          "PPO_FAST_TRL_TESTS to a checkout's copy to run them")
def test_trls_own_helper_tests_pass_with_the_patch(patched):
    """TRL's TestSelectiveLogSoftmax and TestEntropyFromLogits on the patched helpers: every float32 and
    float64 case passes; the only failures are the half-precision cases (TRL's dtype2/dtype3 =
    float16/bfloat16), which compare with half-precision math exactly (README)."""
    import re
    import subprocess
    import sys

    code = ("import sys, pytest; from ppo_fast.integrations import trl; trl.patch(); "
            f"sys.exit(pytest.main([{TRL_TESTS!r}, '-q', '-rf', '-p', 'no:cacheprovider', '-k', "
            "'SelectiveLogSoftmax or EntropyFromLogits']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(TRL_TESTS))).stdout
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) > 0, out[-3000:]
    assert all(re.search(r"\[(\w+-)?dtype[23]\b", name) for name in failed), out[-3000:]


def test_no_warning_in_a_plain_patched_run(tmp_path, patched):
    patched()
    trainer = tiny_grpo_trainer(tmp_path, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train()
    assert not math.isnan(losses(trainer)[0])
