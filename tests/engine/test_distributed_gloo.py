"""Two processes (gloo, CPU) under DistributedDataParallel: the pooled reports, multipliers
and parameters are identical on both ranks, and equal (to rounding) to one process on the
concatenated batch, where that is exact (same probes, equal batch sizes, float64, no dropout).
"""

from __future__ import annotations

import math
import socket

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from layerwise.engine import LayerwiseOptimizer
from layerwise.experiments.history_file import HistoryFile
from layerwise.policies import SensitivityController

from .helpers import loss_fn, mlp, named_groups

WORLD, STEPS, EVERY, HALF = 2, 6, 2, 8
# reverse-over-reverse HVPs: spares each child the one-off load of forward-mode decompositions
ESTIMATOR = {"probes": 4, "quantities": "all", "variance": "per_example", "hvp_mode": "vjp"}
TWO_BATCH = {"probes": 2, "quantities": ["grad_norm", "grad_variance"], "variance": "two_batch"}


def _engine(model, net, callback=None, estimator=ESTIMATOR):
    base = torch.optim.SGD(named_groups(net), lr=0.1, momentum=0.9)
    controller = SensitivityController("curvature+noise", alpha=1.0, max_rel_stderr=math.inf)
    return LayerwiseOptimizer(
        base, model=model, loss_fn=loss_fn, controller=controller, recalibrate_every=EVERY,
        estimator=estimator, seed=3, callback=callback,
    )  # fmt: skip


def _batches():
    """Learnable labels (a fixed linear teacher), so the gradient signal is not all noise."""
    g = torch.Generator().manual_seed(9)
    teacher = torch.randn(6, 3, generator=g, dtype=torch.float64)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * HALF, 6, generator=g, dtype=torch.float64)
        out.append((x, (3 * x @ teacher).argmax(1)))
    return out


def _train(model, net, opt, rank=None):
    for x, y in _batches():
        if rank is not None:
            x, y = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step((x, y))


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        net = mlp(dropout=0.0, dtype=torch.float64)
        model = DistributedDataParallel(net)
        reports = []
        history = HistoryFile(f"{folder}/history.csv")
        opt = _engine(model, net, [history, lambda rec: reports.append(rec.report.to_dict())])
        _train(model, net, opt, rank)
        params = [p.detach().clone() for p in net.parameters()]
        # two-batch noise: each rank's local gradient is a small batch, the all-reduced one big
        two_batch = []
        other = _engine(model, net, callback=lambda rec: two_batch.append(rec.report.to_dict()),
                        estimator=TWO_BATCH)  # fmt: skip
        _train(model, net, other, rank)
        skip = _skip_on_one_rank(model, net, rank)
        torch.save(
            {
                "params": params,
                "multipliers": opt.multipliers,
                "reports": reports,
                "two_batch": two_batch,
                "history": opt.history.drop(columns="estimate_seconds"),
                "skip": skip,
            },
            f"{folder}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _skip_on_one_rank(model, net, rank: int) -> dict:
    """A NaN in rank 1's gradient only (after DDP's all-reduce): both ranks skip the step."""
    opt = _engine(model, net)
    x, y = _batches()[0]
    batch = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]
    opt.zero_grad()
    loss_fn(model, batch).backward()
    if rank == 1:
        net[0].bias.grad[0] = math.nan
    kept = [p.detach().clone() for p in net.parameters()]
    opt.step(batch)
    return {
        "unchanged": all(torch.equal(a, b) for a, b in zip(kept, net.parameters(), strict=True)),
        "counts": (opt.steps, opt.nonfinite_steps),
        "reason": opt.history["reason"].iloc[0],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip(report: dict) -> dict:
    return {**report, "cost": {**report["cost"], "seconds": 0.0}}


@pytest.mark.slow  # two fresh interpreters import torch: well over 10 s on a loaded 2-core box
def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["multipliers"] == r1["multipliers"]
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    assert [_strip(r) for r in r0["reports"]] == [_strip(r) for r in r1["reports"]]
    pd.testing.assert_frame_equal(r0["history"], r1["history"])
    assert (r0["history"]["multiplier"] != 1.0).any()  # the controller did adapt
    assert r0["skip"]["unchanged"] and r1["skip"]["unchanged"]
    assert r0["skip"]["counts"] == r1["skip"]["counts"] == (0, 1)
    assert r0["skip"]["reason"].startswith("skipped: non-finite gradients in another rank")
    assert r1["skip"]["reason"].startswith("skipped: non-finite gradients in group(s) fc0")

    assert [_strip(r) for r in r0["two_batch"]] == [_strip(r) for r in r1["two_batch"]]
    for report in r0["two_batch"]:
        assert report["cost"]["examples"] == WORLD * HALF
        assert report["settings"]["distributed"] == {"world_size": WORLD, "sizes": [HALF, HALF]}
        assert all(g["grad_variance"] is not None and g["grad_variance_stderr"] is None
                   for g in report["groups"])  # fmt: skip

    # only rank 0 wrote the shared history file (HistoryFile, a callback)
    written = pd.read_csv(tmp_path / "history.csv")
    assert len(written) == len(r0["history"]) == 3 * (STEPS // EVERY)

    # one process on the concatenated batches
    net = mlp(dropout=0.0, dtype=torch.float64)
    reports = []
    opt = _engine(net, net, callback=lambda rec: reports.append(rec.report))
    _train(net, net, opt)
    assert len(reports) == len(r0["reports"])
    for ours, theirs in zip(reports, r0["reports"], strict=True):
        for g in theirs["groups"]:
            mine = ours[g["group"]]
            for field in ("hessian_trace", "grad_norm", "grad_variance", "noise_to_signal"):
                assert g[field] == pytest.approx(getattr(mine, field), rel=1e-9), field
    assert list(r0["history"]["multiplier"]) == pytest.approx(
        list(opt.history["multiplier"]), rel=1e-9
    )
    for a, b in zip(r0["params"], net.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-12)
