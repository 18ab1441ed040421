"""Load a peer's own modules (verl, OpenRLHF, TRL, Liger-Kernel) for the adapter tests, without
the rest of the peer: the peers are installed with `pip install --no-deps` (see the Makefile's
`peers` target), their package __init__ files (which start Ray, DeepSpeed, vLLM, ...) are not
run, and the heavy packages that the loaded modules import but the compared functions never
call are stand-ins. What is compared is the peer's real source file."""
import contextlib
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
    parent packages as bare namespaces and the `stand_ins` modules (those not installed or
    loaded) replaced for the duration of the import."""
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
    for name, values in (attrs or {}).items():
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, *name.split("."))]
            sys.modules[name] = package
        for key, value in values.items():
            setattr(sys.modules[name], key, value)
    with standing_in(stand_ins):
        return importlib.import_module(module)


@contextlib.contextmanager
def standing_in(names):
    """Stand-ins for the modules `names` that are neither installed nor loaded, for the block only:
    afterwards other code must not take them for the real thing."""
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = _Stand_in(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def own_tests(peer_module, relative_path: str, stand_ins=()):
    """A peer's own test file (shipped in its wheel beside the package) as a module; skip if absent."""
    package = peer_module.__name__.split(".")[0]
    site = peer_module.__file__[:peer_module.__file__.rindex(os.sep + package + os.sep) + 1]
    path = os.path.join(site, *relative_path.split("/"))
    if not os.path.isfile(path):
        pytest.skip(f"{package}'s own tests are not installed ({path})")
    spec = importlib.util.spec_from_file_location(f"{package}_own_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    with standing_in(stand_ins):
        spec.loader.exec_module(module)
    return module


def verl_core_algos():
    return load("verl.trainer.ppo.core_algos",
                stand_ins=("ray", "tensordict", "verl.trainer.config", "verl.workers.config", "verl.protocol"),
                attrs={"verl.utils": {"as_torch_index": None, "group_mean_std": None}})


def verl_rollout_corr_helper():
    """verl's rollout correction (its DataProto needs tensordict, installed by `make peers`)."""
    pytest.importorskip("tensordict", reason="verl's rollout_corr_helper needs tensordict (make peers)")
    return load("verl.trainer.ppo.rollout_corr_helper",
                stand_ins=("ray", "verl.trainer.config", "verl.trainer.config.algorithm", "verl.workers.config",
                           "verl.workers.config.actor"))


def verl_torch_functional():
    return load("verl.utils.torch_functional", stand_ins=("tensordict",))


OPENRLHF_STAND_INS = ("deepspeed", "flash_attn", "flash_attn.bert_padding")


def openrlhf_models():
    """(openrlhf.models.loss, openrlhf.models.utils)."""
    return (load("openrlhf.models.loss", stand_ins=OPENRLHF_STAND_INS),
            load("openrlhf.models.utils", stand_ins=OPENRLHF_STAND_INS))


def openrlhf_experience_maker():
    return load("openrlhf.trainer.ppo_utils.experience_maker",
                stand_ins=("ray", "deepspeed", "flash_attn", "openrlhf.trainer.ppo_utils.experience",
                           "openrlhf.trainer.ppo_utils.length_penalty", "openrlhf.trainer.ray.launcher",
                           "openrlhf.utils.logging_utils", "openrlhf.utils.seqlen_balancing", "openrlhf.utils.utils",
                           "vllm", "openrlhf.trainer.ray.vllm_engine", "openrlhf.utils.remote_rm_utils"))


def trl_utils():
    """trl.trainer.utils, imported for real where TRL's own dependencies (accelerate, datasets) are
    installed (make peers installs them), else its file alone with stand-ins."""
    try:
        import trl.trainer.utils as utils

        return utils
    except ImportError:
        return load("trl.trainer.utils", stand_ins=("pandas", "datasets", "trl.trainer.model_config"))


# A sitecustomize for a fresh process that imports a peer whole (its package __init__ included):
# any import under the given top-level names that is not installed is answered with a module whose
# every attribute is anything (an attribute, a call, a decorator, an index, a base class). For
# imports the process's path never uses; the test says which ones those are.
STAND_IN_SITE = """
import importlib.abc, importlib.machinery, sys, types
STAND_IN = {names!r}


class _Anything:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(self._name + "." + name)

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return _Anything(self._name + "()")

    def __getitem__(self, item):
        return self

    def __mro_entries__(self, bases):
        return (object,)


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(self.__name__ + "." + name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in STAND_IN and importlib.machinery.PathFinder.find_spec(top) is None:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Finder())
"""


def stand_in_site(folder, names) -> str:
    """Write STAND_IN_SITE for `names` as folder/sitecustomize.py; returns the folder (for PYTHONPATH)."""
    path = os.path.join(str(folder), "sitecustomize.py")
    with open(path, "w") as f:
        f.write(STAND_IN_SITE.format(names=tuple(names)))
    return str(folder)
