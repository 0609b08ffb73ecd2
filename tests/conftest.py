"""Helpers shared by the op tests (tests/test_op_*.py). tests/ is not a package, so they are handed
out as session fixtures rather than imported."""

import pytest
import torch


def _ragged_rewards(num_groups, max_size, dtype, seed, nan_fraction=0.1, device="cpu"):
    """Continuous rewards in ragged groups of 0..max_size rewards, with NaNs sprinkled in.
    Returns (rewards (N,), offsets (G+1,) int64), both on `device`."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_size + 1, (num_groups,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    rewards = torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64) * 2 + 0.5
    rewards[torch.rand(rewards.shape, generator=gen) < nan_fraction] = float("nan")
    return rewards.to(device=device, dtype=dtype), offsets.to(device)


def _bits(tensor):
    """The exact bit pattern of a tensor, so that NaNs compare equal and -0.0 differs from 0.0."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.detach().contiguous().view(ints[tensor.element_size()])


@pytest.fixture(scope="session")
def ragged_rewards():
    return _ragged_rewards


@pytest.fixture(scope="session")
def bits():
    return _bits
