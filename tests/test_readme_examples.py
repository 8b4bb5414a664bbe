"""The README's Python examples run, in order, on a small model (documentation that cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


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
