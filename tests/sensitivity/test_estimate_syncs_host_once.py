"""``estimate`` reads device values on the host once, at the end (docs/design.md: no host
synchronisation inside the probe loop), and once per chunk only when a tolerance asks.

No GPU is needed to check it: every way Python code can pull a tensor's value to the host
(``item``, ``tolist``, ``bool``/``float``/``int`` conversions, ``numpy``) is counted
while ``estimate`` runs on CPU, for every estimator path.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from layerwise.sensitivity import estimate

from .cases import cross_entropy

DT = torch.float64
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    counts: Counter[str] = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _loss(model, batch):
    return cross_entropy(model(batch[0]), batch[1])


def _dropout():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Tanh(), nn.Linear(4, 2)).double()


def _batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()


OPTIONS = [
    (_dropout, {}),
    (_dropout, {"isolated": True}),
    (_dropout, {"hvp_mode": "jvp"}),
    (_dropout, {"variance": "micro_batch", "micro_batches": 3}),
    (_dropout, {"variance": "two_batch"}),
    (_batchnorm, {"micro_batches": 2}),
]


@pytest.mark.parametrize("make, options", OPTIONS, ids=[str(o) for _, o in OPTIONS])
def test_without_tolerance_the_only_host_read_is_the_final_transfer(make, options, host_reads):
    model = make()
    x, y = _data(9)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # two batches of unequal size
    report = estimate(model, _loss, batches, probes=4, chunk_size=2, **options)
    assert dict(host_reads) == {"tolist": 1}
    assert report.cost.batches == 2


def test_with_tolerance_one_read_per_chunk_of_probes(host_reads):
    x, y = _data()
    report = estimate(
        _dropout(), _loss, (x, y), quantities=["hessian_trace"], probes=6, chunk_size=2,
        tolerance=1e-12, max_probes=6,
    )  # fmt: skip
    chunks = report.cost.hvps // 2
    assert dict(host_reads) == {"tolist": 1, "__bool__": chunks}  # one check per chunk
