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


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match=r"group_size: 4 does not divide the batch of 6 scores"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=r"mode: expected one of"):
        group_advantages(torch.zeros(6), 3, mode="ppo")
    with pytest.raises(ValueError, match=r"group_size: expected an int >= 1"):
        group_advantages(torch.zeros(6), 0)
