"""Fixtures of the ablation tests: one uninterrupted tiny ablation per test session."""

from __future__ import annotations

import shutil

import pytest

from layerwise.experiments.config import load_config
from layerwise.experiments.runner import ablate

from .ablations import TINY, TINY_RUNS


@pytest.fixture(scope="session")
def tiny_ablation(tmp_path_factory):
    """The tiny ablation run once, uninterrupted, without a report. Read-only: copy it."""
    out = tmp_path_factory.mktemp("tiny") / "out"
    result = ablate(load_config(TINY), out, progress=False, report=False)
    assert result.ran == TINY_RUNS and not result.failed
    return out


@pytest.fixture
def tiny_copy(tiny_ablation, tmp_path):
    """A copy of :func:`tiny_ablation` that a test may change."""
    out = tmp_path / "out"
    shutil.copytree(tiny_ablation, out)
    return out
