"""ppo_fast inside verl's own actor: verl 0.9.1's ActorRolloutRefWorker -> TrainingWorker ->
FSDPEngineWithLMHead (FSDP2) -> verl.workers.utils.losses.ppo_loss, one update on one gloo rank on
CPU, in fresh processes (tests/integrations/verl_actor_run.py says what stands in for the GPU
machine). ppo_fast's loss modes are found through its `verl.plugins` entry point (nothing imports
ppo_fast's verl module by hand), and ppo_fast's fused head through verl's external_lib switch."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from peers import stand_in_site
from support import tiny_tokenizer


def installed(name: str) -> bool:
    """Whether a package is there, without importing it (`import verl` itself needs Ray)."""
    if name in sys.modules:  # perhaps loaded bare by tests/peers.py (no spec)
        return True
    return importlib.util.find_spec(name) is not None


MISSING = [name for name in ("verl", "tensordict", "hydra", "omegaconf") if not installed(name)]
if MISSING:
    pytest.skip(f"verl's actor needs {MISSING} (make peers)", allow_module_level=True)

HERE = os.path.dirname(__file__)
VERL_UNUSED = ("ray", "uvicorn", "fastapi")  # imported by verl's worker modules, unused on this path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Llama with an untied LM head (FSDP2 shards it: a DTensor weight) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("verl_actor_model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
                     ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def run_actor(tmp_path, model_dir, loss_mode, fused_head=None, fp32=False):
    """verl_actor_run.py in a fresh process: (the completed process, its output file)."""
    out = tmp_path / f"{loss_mode}-{fused_head}-{'fp32' if fp32 else 'bf16'}.pt"
    site = stand_in_site(tmp_path, VERL_UNUSED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, HERE]), "VERL_PLATFORM": "cpu",
           "VERL_ENGINE_DEVICE": "cuda", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, os.path.join(HERE, "verl_actor_run.py"), str(out), model_dir, loss_mode]
    args += (["--fused-head", fused_head] if fused_head else []) + (["--fp32"] if fp32 else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    return result, out


def actor_update(tmp_path, model_dir, loss_mode, fused_head=None, fp32=False):
    """(metrics, parameters after the step, calls of ppo_fast's fused head) of one update of verl's actor."""
    result, out = run_actor(tmp_path, model_dir, loss_mode, fused_head, fp32)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = torch.load(out)
    return saved["metrics"], saved["params"], saved["ppo_fast_head"]


def update_error(params, exact, initial):
    """Relative error of a step's parameter change against another's, over all parameters."""
    num = sum(((params[n] - exact[n]).double() ** 2).sum() for n in exact)
    return (num / sum(((exact[n] - initial[n]).double() ** 2).sum() for n in exact)).sqrt().item()


def assert_same_update(ours, theirs, initial):
    """Every logged metric to 1e-5, and the parameters' step to 1e-5 relative (AdamW's first step is
    lr * g / (|g| + eps): where a gradient entry is near eps, fp32 rounding moves it by up to 1e-4 of
    a step, so the step is compared as a whole)."""
    (metrics, params, _), (want_metrics, want_params, _) = ours, theirs
    assert metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert params.keys() == want_params.keys()
    assert all(not torch.equal(p, initial[n]) for n, p in want_params.items())  # every parameter moved
    assert update_error(params, want_params, initial) < 1e-5


@pytest.fixture(scope="module")
def initial_params(model_dir):
    from transformers import AutoModelForCausalLM

    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}


@pytest.mark.parametrize("theirs, ours", [("vanilla", "ppo_fast"), ("cispo", "ppo_fast_cispo"),
                                          ("gspo", "ppo_fast_gspo")])
def test_ppo_fast_loss_modes_train_verls_actor_as_verls_own(tmp_path, model_dir, initial_params, theirs, ours):
    """loss_mode=ppo_fast (the one config line) in verl's own actor: every metric verl logs (pg_loss,
    clip fractions, ppo_kl, entropy, loss, grad_norm, lr) and every parameter after the update equal
    to verl's own loss mode's, with verl's entropy bonus through the same step."""
    assert_same_update(actor_update(tmp_path, model_dir, ours), actor_update(tmp_path, model_dir, theirs),
                       initial_params)


def test_ppo_fast_fused_head_in_verls_actor(tmp_path, model_dir, initial_params):
    """use_fused_kernels=True with external_lib=ppo_fast.integrations.verl_fused_head: verl's model
    forward builds ppo_fast's FusedLinearForPPO, which runs on the FSDP2-sharded (DTensor) untied LM
    head. Without mixed precision the update equals verl's own unfused actor's (the same math through
    the logits); under verl's default bf16 mixed precision the step is no further from that fp32 step
    than verl's own bf16 step is (verl forms bf16 logits; ppo_fast accumulates in fp32). verl's own
    fused head cannot run this set-up: it multiplies the hidden states by the DTensor weight."""
    ours = actor_update(tmp_path, model_dir, "ppo_fast", fused_head="ppo_fast", fp32=True)
    exact = actor_update(tmp_path, model_dir, "vanilla", fp32=True)
    assert ours[2] > 0  # ppo_fast's head ran, in verl's forward
    assert_same_update(ours, exact, initial_params)
    ours_bf16 = actor_update(tmp_path, model_dir, "ppo_fast", fused_head="ppo_fast")
    theirs_bf16 = actor_update(tmp_path, model_dir, "vanilla")
    assert ours_bf16[2] > 0
    ours_error = update_error(ours_bf16[1], exact[1], initial_params)
    theirs_error = update_error(theirs_bf16[1], exact[1], initial_params)
    assert ours_error <= theirs_error * 1.05, (ours_error, theirs_error)
    verls_fused, _ = run_actor(tmp_path, model_dir, "vanilla", fused_head="verl")
    assert verls_fused.returncode != 0 and "mixed torch.Tensor and DTensor" in verls_fused.stderr
