"""Load a peer's own modules (verl, OpenRLHF, TRL, Liger-Kernel) for the adapter tests, without
the rest of the peer: the peers are installed with `pip install --no-deps` (see the Makefile's
`peers` target), their package __init__ files (which start Ray, DeepSpeed, vLLM, ...) are not
run, and the heavy packages that the loaded modules import but the compared functions never
call are stand-ins. What is compared is the peer's real source file."""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest


class _Stand_in(types.ModuleType):
    """A module whose every attribute is a fresh class (usable in isinstance, annotations,
    decorators and subclassing), for imports the compared functions never use."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: a[0] if a else None})
        setattr(self, name, value)
        return value


def _package_dir(top: str):
    if top in sys.modules and getattr(sys.modules[top], "__path__", None):
        return list(sys.modules[top].__path__)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{top} is not installed (make peers)", allow_module_level=True)
    return list(spec.submodule_search_locations)[0]


def load(module: str, *, stand_ins=(), attrs=None):
    """Import `module` (e.g. "verl.trainer.ppo.core_algos") from the installed peer with its
    parent packages as bare namespaces and `stand_ins` modules replaced."""
    if module in sys.modules:
        return sys.modules[module]
    top = module.split(".")[0]
    root = os.path.dirname(_package_dir(top))
    parts = module.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, *parts[:i])]
            sys.modules[name] = package
    for name in stand_ins:
        if name not in sys.modules or not isinstance(sys.modules[name], _Stand_in):
            sys.modules[name] = _Stand_in(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    for name, values in (attrs or {}).items():
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, *name.split("."))]
            sys.modules[name] = package
        for key, value in values.items():
            setattr(sys.modules[name], key, value)
    return importlib.import_module(module)


def verl_core_algos():
    return load("verl.trainer.ppo.core_algos",
                stand_ins=("ray", "tensordict", "verl.trainer.config", "verl.workers.config", "verl.protocol"),
                attrs={"verl.utils": {"as_torch_index": None, "group_mean_std": None}})


def verl_torch_functional():
    return load("verl.utils.torch_functional", stand_ins=("tensordict",))


def openrlhf_models():
    """(openrlhf.models.loss, openrlhf.models.utils)."""
    stand_ins = ("deepspeed", "flash_attn", "flash_attn.bert_padding", "transformers.integrations.deepspeed")
    return (load("openrlhf.models.loss", stand_ins=stand_ins), load("openrlhf.models.utils", stand_ins=stand_ins))


def openrlhf_experience_maker():
    return load("openrlhf.trainer.ppo_utils.experience_maker",
                stand_ins=("ray", "deepspeed", "flash_attn", "openrlhf.trainer.ppo_utils.experience",
                           "openrlhf.trainer.ppo_utils.length_penalty", "openrlhf.trainer.ray.launcher",
                           "openrlhf.utils.logging_utils", "openrlhf.utils.seqlen_balancing", "openrlhf.utils.utils",
                           "vllm", "openrlhf.trainer.ray.vllm_engine", "openrlhf.utils.remote_rm_utils"))


def trl_utils():
    return load("trl.trainer.utils", stand_ins=("pandas", "datasets", "trl.trainer.model_config"))
