"""The README's Python examples run, in order, on a small model (documentation that cannot rot).

The blocks of the "Recipes" section are self-contained programs: each runs on its own, in a
fresh namespace and an empty working folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


RECIPES = "## Recipes"


def _sections() -> tuple[str, str]:
    """The README without its recipes section, and the recipes section."""
    text = README.read_text()
    start = text.index(RECIPES)
    end = text.index("\n## ", start + len(RECIPES))
    return text[:start] + text[end:], text[start:end]


def _python_blocks(text: str | None = None) -> list[str]:
    text = _sections()[0] if text is None else text
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


RECIPE_BLOCKS = _python_blocks(_sections()[1])
RECIPE_NEEDS = {"lightning": "lightning.pytorch", "transformers": "transformers"}


def test_the_three_recipes_are_there():
    assert len(RECIPE_BLOCKS) == 3
    assert "opt.step(batch)" in RECIPE_BLOCKS[0]
    assert "layerwise.engine.lightning import LayerwiseCallback" in RECIPE_BLOCKS[1]
    assert "layerwise.engine.huggingface import LayerwiseCallback" in RECIPE_BLOCKS[2]


@pytest.mark.parametrize("block", RECIPE_BLOCKS, ids=["plain_loop", "lightning", "huggingface"])
def test_a_recipe_runs_on_its_own(block, tmp_path, monkeypatch):
    for word, module in RECIPE_NEEDS.items():
        if f"import {word}" in block:
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(block, f"{README}:recipe", "exec"), namespace)
    history = (namespace.get("layerwise") or namespace["opt"]).history
    assert sorted(set(history["step"])) == [4, 8, 12]


def test_readme_python_examples_run_in_order():
    blocks = _python_blocks()
    assert len(blocks) >= 4, "the README lost its Python examples"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    namespace = {"model": model, "x": x, "y": y, "loader": loader}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["report"].names == list(namespace["groups"].names)
    assert namespace["opt"].steps == len(loader)
    assert namespace["lm_groups"]["head"].param_names == ("transformer.wte.weight",)
