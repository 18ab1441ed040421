"""Inputs shared by the loss, KL and advantage tests."""
import torch
from conftest import DEVICE


def ragged_mask(B, T, *, seed=0, dtype=torch.bool, empty_rows=(), gaps=True):
    """Response masks as trainers see them: a prompt prefix and right padding of zeros, a
    response of random length, gaps inside it (tool/observation tokens), some rows empty."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, max(T // 3, 1), (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[b, start:end] = True
        if gaps and end - start > 4:
            mask[b, start + 1 : start + 1 + (end - start) // 4] = False
    for b in empty_rows:
        mask[b] = False
    return mask.to(dtype).to(DEVICE)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)
