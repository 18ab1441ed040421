"""Adapters with the signatures and conventions of other trainers, backed by ppo_fast.ops:
`ppo_fast.integrations.verl`, `.openrlhf`, `.trl`, `.liger`. None of the peers is a dependency;
an adapter imports its peer only where it must (registration, patching). A peer option that
ppo_fast cannot follow raises UnsupportedOption, never computes something else."""


class UnsupportedOption(ValueError):
    """A peer's option or convention that ppo_fast's ops do not implement."""


def unsupported(peer: str, option: str, why: str = ""):
    return UnsupportedOption(f"ppo_fast.integrations.{peer}: {option} is not supported{': ' + why if why else ''}")
