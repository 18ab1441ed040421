"""`ppo-fast rm`: reward-model training on preference pairs, then PPO on the learned reward."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from support import DEVICE, tiny_config  # noqa: E402

from ppo_fast import cli  # noqa: E402
from ppo_fast.ppo import PPOTrainer  # noqa: E402
from ppo_fast.ppo.reward_training import RewardModelTrainer, RMConfig, count_task_pairs  # noqa: E402
from ppo_fast.ppo.tasks import count_reward, hf_digit_tokenizer  # noqa: E402


def rm_config(tmp_path, **overrides):
    values = dict(out=str(tmp_path / "rm"), device=DEVICE.type, progress=False, steps=150, eval_every=50)
    return RMConfig(**{**values, **overrides})


def test_embedded_pairs_prefer_the_higher_count_reward():
    for prompt, chosen, rejected in count_task_pairs(50, torch.Generator().manual_seed(0)):
        assert count_reward([prompt], [chosen])[0] > count_reward([prompt], [rejected])[0]


def test_rm_then_ppo_on_the_learned_reward(tmp_path, capsys):
    """The laptop pipeline: `ppo-fast rm` (held-out accuracy rises), then `ppo-fast train
    reward_model=OUT/model` scores rollouts with it."""
    out = tmp_path / "rm"
    assert cli.main(["rm", "--out", str(out), "steps=300", "eval_every=100", "progress=false",
                     f"device={DEVICE.type}"]) == 0
    evals = [json.loads(line)["eval_accuracy"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "eval_accuracy" in line]
    assert len(evals) == 3 and evals[-1] >= 0.7 and evals[-1] > evals[0], evals
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    trainer = PPOTrainer(tiny_config(tmp_path, reward_model=str(out / "model"), steps=2))
    assert trainer.reward_model is not None and trainer.reward_fn is None
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(m["reward_mean"]) for m in history)


def test_jsonl_pairs_and_an_hf_model_dir(tmp_path):
    root = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=13, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    hf_digit_tokenizer().save_pretrained(root)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r})
                              for p, c, r in count_task_pairs(40, torch.Generator().manual_seed(1))))
    trainer = RewardModelTrainer(rm_config(tmp_path, model=str(root), data=str(data), steps=4, eval_every=2,
                                           batch_size=8))
    history = trainer.train()
    assert [m["step"] for m in history] == [1, 2, 3, 4] and "eval_accuracy" in history[-1]
    saved = tmp_path / "rm" / "model"
    assert (saved / "config.json").exists() and (saved / "tokenizer.json").exists()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(saved)
    assert loaded.config.num_labels == 1


def test_resume_continues_exactly(tmp_path):
    whole = RewardModelTrainer(rm_config(tmp_path / "a", steps=20, eval_every=10)).train()
    RewardModelTrainer(rm_config(tmp_path / "b", steps=10, eval_every=10)).train()
    resumed = RewardModelTrainer(rm_config(tmp_path / "b", steps=20, eval_every=10)).train(resume=True)
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in whole[10:]], rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["unknown_key=1"], "unknown config key"),
    (["data=/nonexistent.jsonl"], "data: '/nonexistent.jsonl' does not exist"),
    (["eval_fraction=1.5"], "eval_fraction: expected a value in"),
])
def test_bad_rm_config_is_reported_before_loading(tmp_path, capsys, argv, message):
    assert cli.main(["rm", "--out", str(tmp_path / "rm"), *argv]) == 2
    assert message in capsys.readouterr().err
