"""group_advantages: closed forms of grpo, rloo and none; bad inputs."""
import pytest
import torch
from support import DEVICE

from ppo_fast.ops import group_advantages

OP = "group_advantages"  # the `backend` fixture runs over this op's backends


def test_group_advantages_closed_forms(backend):
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], device=DEVICE)
    grpo = group_advantages(scores, 3)
    torch.testing.assert_close(grpo[:3], torch.tensor([-1.0, 0.0, 1.0], device=DEVICE) / (1 + 1e-6))
    torch.testing.assert_close(grpo[3:], torch.zeros(3, device=DEVICE))
    rloo = group_advantages(scores, 3, mode="rloo")
    torch.testing.assert_close(rloo[:3], torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5], device=DEVICE))
    torch.testing.assert_close(group_advantages(scores, 3, mode="none")[:3], torch.tensor([-1.0, 0.0, 1.0],
                                                                                          device=DEVICE))
    assert torch.all(group_advantages(scores, 1) == 0)


def test_groups_of_unequal_sizes_are_each_their_own(backend):
    """Sizes listed: each group's advantages are those of the group alone (float64 closed forms),
    a group of one gets 0."""
    g = torch.Generator().manual_seed(0)
    sizes = [3, 1, 5, 2]
    scores = torch.randn(sum(sizes), generator=g).to(DEVICE)
    for mode in ("grpo", "rloo", "none"):
        got = group_advantages(scores, sizes, mode=mode)
        start = 0
        for size in sizes:
            alone = group_advantages(scores[start:start + size], size, mode=mode)
            assert torch.equal(got[start:start + size], alone), (mode, size)
            x = scores[start:start + size].double()
            if size == 1:
                want = torch.zeros(1, dtype=torch.float64)
            elif mode == "grpo":
                want = (x - x.mean()) / (x.std() + 1e-6)
            elif mode == "rloo":
                want = x - (x.sum() - x) / (size - 1)
            else:
                want = x - x.mean()
            torch.testing.assert_close(got[start:start + size].double().cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
            start += size
    even = torch.randn(12, generator=g).to(DEVICE)
    assert torch.equal(group_advantages(even, [4, 4, 4]), group_advantages(even, 4))


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match=r"group_size: 4 does not divide the batch of 6 scores"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=r"mode: expected one of"):
        group_advantages(torch.zeros(6), 3, mode="ppo")
    with pytest.raises(ValueError, match=r"group_size: expected an int >= 1"):
        group_advantages(torch.zeros(6), 0)
    with pytest.raises(ValueError, match=r"group_size: the group sizes add up to 5, expected the batch of 6"):
        group_advantages(torch.zeros(6), [2, 3])
    with pytest.raises(ValueError, match=r"a list of group sizes >= 1, got \[3, 0, 3\]"):
        group_advantages(torch.zeros(6), [3, 0, 3])
