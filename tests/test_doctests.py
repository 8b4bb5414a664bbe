"""The examples in the docstrings of every library module run and print what they claim.

The modules are discovered by walking the four packages, not listed by hand, so a new
module enrols itself. (pytest's ``--doctest-modules`` would import the files by path, as
the bare ``engine.*`` of the source folders, beside the installed ``layerwise.engine.*``.)
Every estimator module of ``layerwise.sensitivity`` must carry at least one example.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("sensitivity", "policies", "engine", "experiments")

#: Modules of layerwise.sensitivity that hold plumbing, not an estimator, and need no example.
PLUMBING = {"errors", "functional", "runner", "validation", "options"}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        root = importlib.import_module(f"layerwise.{package}")
        names.append(root.__name__)
        names += [m.name for m in pkgutil.walk_packages(root.__path__, f"{root.__name__}.")]
    return sorted(names)


MODULES = _modules()


def test_every_package_was_walked():
    assert {m.split(".")[1] for m in MODULES} == set(PACKAGES)
    assert len(MODULES) > 40


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    short = name.rsplit(".", 1)[-1]
    if name.startswith("layerwise.sensitivity.") and short not in PLUMBING:
        assert result.attempted > 0, f"{name} has no example in its docstrings"
