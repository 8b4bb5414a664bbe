"""Shared test configuration."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: CI replays a fixed, derandomized set of examples so that a run is
# reproducible; a developer's run keeps exploring new ones (and prints the failing blob).
settings.register_profile(
    "ci", derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", print_blob=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

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
