"""Batches and losses as users have them.

Dicts, named tuples, dataclasses, nested tuples and ``transformers.BatchEncoding`` are
sliced (per-example ``vmap``, micro-batches), cast, moved and sized wherever the library
touches a batch, and give the very numbers a plain tuple gives. Models that return their
own loss (``ModelOutput.loss``, a dict's ``"loss"``) have :func:`model_output_loss`.
Language-model outputs ``[N, T, V]`` with ``ignore_index``: per-example gradients are
B × each example's share of the batch's gradient, also for an example whose tokens are all
ignored, on the factorised and the ``vmap`` path alike (float64 loop as the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from layerwise.sensitivity import ModelOutputLoss, default_groups, estimate, model_output_loss
from layerwise.sensitivity.batching import (
    batch_size_of,
    cast_batch,
    flatten_batch,
    move_batch,
    slice_batch,
)

from .cases import IGNORE, SMOOTHING, tied_lm

transformers = pytest.importorskip("transformers")


class Net(nn.Module):
    """Takes ``x`` and a 0/1 ``mask``; ``scale`` is used outside any covered layer, so its
    per-example statistics come from ``vmap``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 2.0]))
        self.out = nn.Linear(3, 2)

    def forward(self, x, mask, labels=None):
        h = torch.tanh(self.fc(x) * self.scale) * mask.unsqueeze(-1)
        logits = self.out(h)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


class Pair(NamedTuple):
    inputs: dict
    labels: torch.Tensor


@dataclass
class Batch:
    x: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    note: str = "kept"


def _data():
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.float64)
    return net, x, mask, torch.randint(0, 2, (6,))


def _layouts():
    net, x, mask, y = _data()

    def from_tuple(m, b):
        return m(b[0], b[1], b[2])["loss"]

    def from_pair(m, b):
        return m(**b.inputs, labels=b.labels)["loss"]

    def from_nested(m, b):
        (xx, extra), yy = b
        return m(xx, extra["mask"], yy)["loss"]

    def from_dataclass(m, b):
        return m(b.x, b.mask, b.labels)["loss"]

    plain = {"x": x, "mask": mask, "labels": y}
    return net, [
        ("tuple", (x, mask, y), from_tuple),
        ("dict", plain, model_output_loss),
        ("batch_encoding", transformers.BatchEncoding(plain), model_output_loss),
        ("named_tuple", Pair({"x": x, "mask": mask}, y), from_pair),
        ("nested", ((x, {"mask": mask, "tag": "t"}), y), from_nested),
        ("dataclass", Batch(x, mask, y), from_dataclass),
    ]


@pytest.mark.parametrize("variance", ["per_example", "micro_batch"])
def test_every_layout_gives_the_numbers_of_a_plain_tuple(variance):
    net, layouts = _layouts()
    reports = {
        name: estimate(net, loss, batch, probes=3, variance=variance, micro_batches=3)
        for name, batch, loss in layouts
    }
    baseline = reports.pop("tuple")
    if variance == "per_example":
        assert baseline.settings["per_example"] == "factorised+vmap"
    for name, report in reports.items():
        for g in baseline.names:
            for q in ("grad_norm", "grad_variance", "hessian_trace"):
                assert getattr(report[g], q) == pytest.approx(getattr(baseline[g], q), rel=1e-12), (
                    name, g, q,
                )  # fmt: skip


def test_slicing_casting_moving_and_sizing_keep_the_containers():
    _, layouts = _layouts()
    for name, batch, _ in layouts:
        assert batch_size_of(batch) == 6, name
        part = slice_batch(batch, 6, 1, 3)
        assert type(part) is type(batch), name
        leaves = [t for t in flatten_batch(part)[0] if isinstance(t, torch.Tensor)]
        assert leaves and all(t.shape[0] == 2 for t in leaves), name
        cast = cast_batch(batch, torch.float32)
        assert type(cast) is type(batch)
        floats = [t for t in flatten_batch(cast)[0] if isinstance(t, torch.Tensor)
                  and t.is_floating_point()]  # fmt: skip
        assert floats and all(t.dtype == torch.float32 for t in floats), name
        assert type(move_batch(batch, "cpu")) is type(batch)
    encoding = slice_batch(layouts[2][1], 6, 0, 2)
    assert isinstance(encoding, transformers.BatchEncoding) and encoding["x"].shape == (2, 4)
    assert slice_batch(layouts[5][1], 6, 0, 1).note == "kept"


def test_model_output_loss_reads_a_model_output_a_dict_or_a_scalar():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=8, num_labels=2,
    )  # fmt: skip
    bert = transformers.BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, 20, (3, 5)), "labels": torch.tensor([0, 1, 1])}
    assert model_output_loss(bert, batch) == bert(**batch).loss
    net, x, mask, y = _data()
    assert model_output_loss(net, (x, mask, y)) == net(x, mask, y)["loss"]

    class Scalar(nn.Module):
        def forward(self, b):
            return b.sum()

    assert model_output_loss(Scalar(), torch.ones(2)) == 2
    with pytest.raises(ValueError, match=r"its 'loss' is None.*batch\['labels'\]"):
        model_output_loss(net, (x, mask))
    with pytest.raises(
        ValueError, match=r"returned no loss \(it has no 'loss'.*keys are \['last_hidden_state'"
    ):
        model_output_loss(bert.bert, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match=r"a tensor of shape \(6, 3\), not a scalar loss"):
        model_output_loss(nn.Linear(4, 3).double(), x)
    with pytest.raises(ValueError, match=r"ModelOutputLoss\(key='logits'\).*scalar tensor"):
        ModelOutputLoss("logits")(net, (x, mask))
    with pytest.raises(TypeError, match="key must be a non-empty string"):
        ModelOutputLoss("")


def _share_gradients(case, names):
    """(B, P): g_i = B × ∇(Σ_{t∈i} ℓ_t / M), one autograd call per example (float64)."""
    model, (tokens, targets) = case.model, case.batch
    size = tokens.shape[0]
    m = (targets != IGNORE).sum()
    params = dict(model.named_parameters())
    rows = []
    for i in range(size):
        logits = model(tokens[i : i + 1])
        total = F.cross_entropy(logits.flatten(0, 1), targets[i], ignore_index=IGNORE,
                                label_smoothing=SMOOTHING, reduction="sum")  # fmt: skip
        grads = torch.autograd.grad(size * total / m, [params[n] for n in names],
                                    allow_unused=True, materialize_grads=True)  # fmt: skip
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("variance", ["per_example", "micro_batch"])
def test_token_losses_with_ignored_examples_give_exact_per_example_statistics(variance):
    case = tied_lm()  # example 2 has every token ignored, example 0 two of six
    groups = default_groups(case.model)
    report = estimate(
        case.model,
        case.loss_object,
        case.batch,
        quantities=["grad_variance"],
        variance=variance,
        micro_batches=4,
    )  # fmt: skip: 4 pieces of 1 example
    if variance == "per_example":
        assert report.settings["per_example"] == "factorised+vmap"  # the tied weight: vmap
    for g, members in groups.items():
        rows = _share_gradients(case, members)
        mean = rows.mean(0)
        full = torch.autograd.grad(case.loss_fn(case.model, case.batch),
                                   [case.model.get_parameter(n) for n in members])  # fmt: skip
        assert torch.allclose(mean, torch.cat([t.reshape(-1) for t in full]), atol=1e-12)
        trace = (rows - mean).square().sum() / (rows.shape[0] - 1)
        expected = trace.item() / rows.shape[1]
        assert math.isfinite(report[g].grad_variance)
        assert report[g].grad_variance == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_flattening_a_batch_makes_no_reference_cycle():
    """A batch flattened and rebuilt is freed by reference counting (a rebuilder that closes
    over itself would keep the batch's tensors until the garbage collector found them)."""
    import gc

    from layerwise.sensitivity.batching import flatten_batch

    batch = {"x": torch.zeros(3, 2), "pair": (torch.ones(3), [torch.arange(3), 7])}
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        leaves, rebuild = flatten_batch(batch)
        again = rebuild(leaves)
        del leaves, rebuild
        found = gc.collect()
    finally:
        if enabled:
            gc.enable()
    assert again["pair"][1][1] == 7 and again["x"] is batch["x"]
    assert found == 0, f"{found} objects in reference cycles"
