"""The four models of a PPO run and the forwards the loop needs from them.

Every forward stops at the last hidden states of the response positions; log-probs come from
`fused_linear_logprobs` on those and `lm_head.weight`, values and scores from a [1, H] head,
so no [B, T, V] logits tensor is ever built outside generation.
"""
from __future__ import annotations

import copy
import inspect
import os
import warnings

import torch
from torch import nn

# Below this many parameters a model's ops are too small to gain from intra-op threads on a CPU:
# the parallel regions cost more than they save, and their threads spin on a busy machine.
SMALL_MODEL_PARAMETERS = 10_000_000
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's choice (OMP_NUM_THREADS, else the cores)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under an HF *ForCausalLM / *ForSequenceClassification head."""
    return getattr(model, model.base_model_prefix, model)


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def packing_supported() -> bool:
    """transformers that reads sequence boundaries from position ids (flash-attn varlen, or
    a block-diagonal mask for SDPA / eager)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(path: str, kind: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An HF model from a local directory, never downloading: its weights if the directory has
    them, else built at random from its config.json. kind: "causal-lm" or "reward". Attention
    is flash-attn 2 where installed (CUDA), else PyTorch SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    attn = "flash_attention_2" if flash_attn_available(device) else "sdpa"
    if any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES):
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True, attn_implementation=attn)
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **({"num_labels": 1} if kind == "reward" else {}))
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn)
    if kind == "causal-lm":
        check_plain_lm_head(model)
    elif model.config.num_labels != 1:
        raise ValueError(f"reward_model: {path!r} has num_labels={model.config.num_labels}; expected 1 (a scalar score)")
    return model.to(device).eval()


def check_plain_lm_head(model: nn.Module) -> None:
    """The fused log-probs assume logits = h @ lm_head.weight^T (+ bias)."""
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"policy: config.{attr}={getattr(model.config, attr)} transforms the logits; "
                             f"ppo_fast's fused log-probs support logits = lm_head(h) only")
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        raise ValueError(f"policy: expected an nn.Linear lm_head, got {type(model.get_output_embeddings()).__name__}")


DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                       "summary_first_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere (modules and the config values attention layers read), so train
    mode, needed by gradient checkpointing, computes what eval mode does."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        config = getattr(module, "config", None)
        for key in DROPOUT_CONFIG_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
    return model


def add_lora(model: nn.Module, rank: int, alpha: float, target_modules: str):
    """PEFT LoRA adapters on the policy (lm_head excluded): the PeftModel, whose
    `disable_adapter()` gives the reference policy without a second copy."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated name (not ours to rename)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                bias="none"))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gradient_checkpointing_on(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):  # the newer transformers name
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy that takes no gradient (the reference policy)."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def cache_keyword(body: nn.Module) -> str:
    """The keyword the backbone's forward takes its KV cache by: `cache` (transformers >= 5.24,
    where `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward with use_cache=True returned, under either transformers' name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... from each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden(body: nn.Module, sequences, attention_mask, packed: bool = False) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H].

    packed: the rows' real tokens go in as one padding-free row, with position ids restarting
    at each sequence; transformers then runs flash-attn's varlen kernel (or, without flash-attn,
    a block-diagonal mask). Pad positions come back as zeros.
    """
    positions = position_ids(attention_mask)
    if not packed:
        return body(input_ids=sequences, attention_mask=attention_mask, position_ids=positions,
                    use_cache=False).last_hidden_state
    real = attention_mask.flatten().nonzero().squeeze(1)
    hidden = body(input_ids=sequences.flatten()[real][None], position_ids=positions.flatten()[real][None],
                  use_cache=False).last_hidden_state[0]
    full = hidden.new_zeros(sequences.numel(), hidden.shape[-1]).index_copy(0, real, hidden)
    return full.view(*sequences.shape, hidden.shape[-1])


def response_hidden(model: nn.Module, sequences, attention_mask, prompt_length: int, packed: bool = False):
    """Last hidden states [B, R, H] at the positions that predict the R response tokens."""
    return last_hidden(backbone(model), sequences, attention_mask, packed)[:, prompt_length - 1:-1]


class ValueModel(nn.Module):
    """An LM backbone and a scalar head: v_t = head(h_t), float32 [B, R]."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body, self.head = body, head

    @classmethod
    def from_model(cls, model: nn.Module, share: bool = False) -> "ValueModel":
        """From a causal LM (a zero head) or a reward model (its score head); `share` reuses
        the model's backbone instead of copying it."""
        body = backbone(model) if share else copy.deepcopy(backbone(model))
        p = next(body.parameters())
        hidden_size = model.config.hidden_size
        score = getattr(model, "score", None)
        head = nn.Linear(hidden_size, 1, bias=False, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if isinstance(score, nn.Linear) and score.weight.shape == (1, hidden_size):
                head.weight.copy_(score.weight)
            else:
                head.weight.zero_()
        return cls(body, head).requires_grad_(True)

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float()

    def forward(self, sequences, attention_mask, prompt_length: int, packed: bool = False) -> torch.Tensor:
        hidden = last_hidden(self.body, sequences, attention_mask, packed)
        return self.values_from_hidden(hidden[:, prompt_length - 1:-1])


def reward_model_scores(model: nn.Module, sequences, attention_mask, packed: bool = False) -> torch.Tensor:
    """The sequence-classification score at each row's last real token, float32 [B]."""
    hidden = last_hidden(backbone(model), sequences, attention_mask, packed)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.score(hidden[rows, last]).squeeze(-1).float()


def set_cpu_threads(setting: int, device: torch.device, model: nn.Module) -> int:
    """Set torch's intra-op thread count for a run on `device` and return it. setting > 0: that
    many; 0 (auto): 1 for a model under SMALL_MODEL_PARAMETERS, else torch's default, unless
    OMP_NUM_THREADS is set (then it is left as torch took it). On CUDA: left alone."""
    if device.type != "cpu":
        return torch.get_num_threads()
    if setting > 0:
        threads = setting
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
        threads = 1 if small else TORCH_DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads
