"""Shared test configuration."""

import pytest
import torch

# The suite runs in two pytest-xdist workers on two cores; one intra-op thread per worker
# avoids oversubscription, which makes tiny-model steps tens of times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Each test starts from the same global seed and default dtype."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
