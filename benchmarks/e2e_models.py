"""Write a random, config-only policy and reward model (any size) plus prompts, for
`ppo-fast bench e2e` where no real checkpoint is at hand:

    python -m benchmarks.e2e_models /tmp/e2e --vocab 32000 --hidden 256 --layers 2
    ppo-fast bench e2e --config /tmp/e2e/run.yaml

Weights are built at random when the run starts (only config.json is written), the
tokenizer knows the digits only (prompts are digits; responses are scored as token ids by
the reward model, never decoded), and EOS is one id among `vocab`, so responses run to
max_new_tokens: every step does the same work.
"""
import argparse
import os

import yaml
from transformers import LlamaConfig

from ppo_fast.ppo.tasks import hf_digit_tokenizer


def write(out: str, vocab: int, hidden: int, layers: int, heads: int) -> str:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    tokenizer = hf_digit_tokenizer()
    for name, num_labels in (("policy", None), ("reward", 1)):
        if num_labels:
            config.num_labels = num_labels
        config.save_pretrained(os.path.join(out, name))
        tokenizer.save_pretrained(os.path.join(out, name))
    with open(os.path.join(out, "prompts.txt"), "w") as f:
        f.writelines(f"{(i * 7919) % 10**8:08d}{i % 97}\n" for i in range(1024))
    run = {"policy": os.path.join(out, "policy"), "reward_model": os.path.join(out, "reward"),
           "prompts": os.path.join(out, "prompts.txt"), "rollout_batch_size": 32, "mini_batch_size": 16,
           "micro_batch_size": 8, "max_new_tokens": 64, "ppo_epochs": 1, "lr": 1e-5, "critic_lr": 1e-5}
    path = os.path.join(out, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(run, f, sort_keys=False)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    print(write(args.out, args.vocab, args.hidden, args.layers, args.heads))
