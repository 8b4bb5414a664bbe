"""The suite is reproducible: under CI (``CI=true``, as CI services set it) the property
tests replay a derandomized set of examples with no example database and no deadline;
locally they explore new examples, still without a timing-dependent deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROBE = (
    "import json, tests.conftest; from hypothesis import settings; d = settings.default; "
    "print(json.dumps([d.derandomize, d.database is None, d.deadline is None]))"
)


def _profile(**env: str) -> list[bool]:
    """[derandomize, no database, no deadline] of the profile tests/conftest.py loads."""
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", ["true", "1"])
def test_ci_replays_a_derandomized_set(value):
    assert _profile(CI=value) == [True, True, True]


@pytest.mark.parametrize("env", [{}, {"CI": "false"}], ids=["unset", "false"])
def test_a_local_run_explores(env):
    derandomize, _, no_deadline = _profile(**env)
    assert not derandomize and no_deadline


def test_an_explicit_profile_wins():
    assert _profile(CI="true", HYPOTHESIS_PROFILE="dev")[0] is False
