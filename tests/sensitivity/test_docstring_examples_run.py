"""The examples in the sensitivity docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "batching", "estimate", "gradient_stats", "groups", "hutchinson", "per_example",
    "probes", "report", "two_batch",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"layerwise.sensitivity.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"sensitivity.{name} has no example"
    assert result.failed == 0
