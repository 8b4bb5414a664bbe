"""Shared test configuration."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: CI replays a fixed, derandomized set of examples (no example database)
# so that a run is reproducible; a developer's run keeps exploring new ones (and prints the
# failing blob). Neither has a deadline: on a loaded machine a slow example is not a bug,
# and a timing-dependent failure would make the suite flaky (tests/test_suite_profiles.py).
# Both derive from Hypothesis's own "default" profile: Hypothesis loads its built-in "ci"
# profile whenever a CI variable exists (even CI=false), and a profile registered without a
# parent would inherit that one.
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", parent=settings.get_profile("default"), deadline=None, print_blob=True
)


def _on_ci() -> bool:
    """Whether the CI variable is set to a true value (CI=true, CI=1; not CI=false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _on_ci() else "dev"))

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
