"""Fail at step 0, not at the first recalibration.

A model that cannot be estimated at all is refused at construction; one that cannot be
estimated with these options is refused at the first ``step(batch)``, before the base step,
by one small dry run; both with :class:`layerwise.engine.PreflightError` naming the module,
the reason and the fix. The dry run changes nothing: a run with it is bit for bit the run
without it. What the estimator chose by itself there (micro-batch statistics for a model
whose per-example gradients ``vmap`` cannot batch) holds from the first recalibration.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from layerwise.engine import LayerwiseOptimizer, PreflightError
from layerwise.policies import SensitivityController
from layerwise.sensitivity import NotMeasurableError, PerExampleFallbackWarning, vmap_fallback

from .helpers import assert_identical, data, loss_fn, mlp, named_groups, params_of


class Fused(nn.Module):
    """Attention through a fused kernel called directly: no second derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x.unsqueeze(1)).unsqueeze(1).chunk(3, -1)
        attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return attend(q, k, v)[0].reshape(x.shape[0], 6)


def _engine(net, controller="curvature", **kwargs):
    groups = [{"params": list(net.parameters()), "name": "all"}]
    return LayerwiseOptimizer(
        torch.optim.SGD(groups, lr=0.1), model=net, loss_fn=loss_fn, controller=controller,
        **kwargs,
    )  # fmt: skip


def _step(opt, net, batch):
    opt.zero_grad()
    loss_fn(net, batch).backward()
    opt.step(batch)


def test_a_model_on_the_meta_device_is_refused_at_construction():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    with pytest.raises(PreflightError, match=r"module 0 \(Linear\) holds '0.weight' on the meta"):
        _engine(net)


def test_inference_tensors_are_refused_at_construction():
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(PreflightError, match=r"module 0 \(Linear\).*inference tensor"):
        _engine(net)


def test_a_layer_without_second_derivative_fails_at_step_0_before_the_base_step():
    torch.manual_seed(0)
    net = nn.Sequential(Fused(), nn.Tanh(), nn.Linear(6, 3))
    opt = _engine(net, recalibrate_every=100)
    before = [p.detach().clone() for p in net.parameters()]
    batch = data(1)[0]
    with pytest.raises(PreflightError) as info:
        _step(opt, net, batch)
    text = str(info.value)
    assert "at step 0, before the first recalibration (after step 100)" in text
    assert "0 (Fused)" in text and "plain PyTorch equivalent" in text  # module and fix
    assert isinstance(info.value, NotMeasurableError)
    assert info.value.__cause__ is not None
    assert_identical(before, list(net.parameters()))  # the base step never ran
    assert opt.steps == 0
    # the rule that reads gradients only needs no second derivative: no error
    ok = _engine(net, controller=SensitivityController("trust_ratio"), recalibrate_every=100)
    _step(ok, net, batch)


def test_a_loss_fn_that_fails_on_this_batch_names_the_module():
    net = mlp()

    def wrong(model, batch):  # a batch of 6 features given to a layer of 5
        return model(batch[0][:, :5]).sum()

    groups = [{"params": list(net.parameters()), "name": "all"}]
    opt = LayerwiseOptimizer(torch.optim.SGD(groups, lr=0.1), model=net, loss_fn=wrong,
                             controller="curvature")  # fmt: skip
    with pytest.raises(PreflightError, match=r"raised in module 0 \(Linear\) by loss_fn"):
        opt.step(data(1)[0])


def test_the_dry_run_changes_nothing():
    """Two runs, with and without the dry run, recalibrating at steps 2 and 4: the same
    parameters, multipliers and history, bit for bit; the global RNG matters (dropout)."""
    runs = []
    for preflight in (True, False):
        net = mlp(seed=3)
        opt = LayerwiseOptimizer(
            torch.optim.SGD(named_groups(net), lr=0.1), model=net, loss_fn=loss_fn,
            controller=SensitivityController("curvature", max_rel_stderr=math.inf),
            recalibrate_every=2, preflight=preflight,
        )  # fmt: skip
        torch.manual_seed(11)
        for batch in data(5):
            _step(opt, net, batch)
        runs.append((params_of(net), opt.multipliers, opt.history, torch.get_rng_state()))
    (p1, m1, h1, r1), (p2, m2, h2, r2) = runs
    assert_identical(p1, p2)
    assert m1 == m2 and torch.equal(r1, r2)
    cols = ["step", "group", "multiplier", "hessian_trace"]
    assert h1[cols].equals(h2[cols])


def test_batches_from_an_iterable_are_peeked_without_counting_or_drawing_randomness():
    net = mlp()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(24, 6), torch.randint(0, 3, (24,))),
        batch_size=8, shuffle=True,
    )  # fmt: skip
    seen = []

    def counting(model, batch):
        seen.append(batch[0].shape[0])
        return loss_fn(model, batch)

    groups = [{"params": list(net.parameters()), "name": "all"}]
    opt = LayerwiseOptimizer(torch.optim.SGD(groups, lr=0.1), model=net, loss_fn=counting,
                             controller="curvature", batches=loader)  # fmt: skip
    opt.zero_grad()
    loss_fn(net, data(1)[0]).backward()
    state = torch.get_rng_state()
    opt.step()  # no batch given: the dry run peeks at the loader
    assert seen and max(seen) <= 4  # a few examples, not the whole batch of 8
    assert opt._source.drawn == 0
    assert torch.equal(torch.get_rng_state(), state)


def test_a_vmap_fallback_is_chosen_at_step_0_and_kept(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(vmap_fallback, "_WARNED", set())
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    bert = transformers.BertForSequenceClassification(config)
    ids = torch.randint(1, 30, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,))}
    from layerwise.sensitivity import model_output_loss

    opt = LayerwiseOptimizer(
        torch.optim.AdamW(bert.parameters(), lr=1e-3), model=bert, loss_fn=model_output_loss,
        controller=SensitivityController("noise", max_rel_stderr=math.inf), recalibrate_every=2,
    )  # fmt: skip
    with pytest.warns(PerExampleFallbackWarning, match="BertModel"):
        opt.zero_grad()
        model_output_loss(bert, batch).backward()
        opt.step(batch)
    assert opt._recalibrator.options.variance == "micro_batch"
    assert "BertModel" in opt._recalibrator.variance_fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerExampleFallbackWarning)
        opt.zero_grad()
        model_output_loss(bert, batch).backward()
        opt.step(batch)  # step 2: a recalibration, micro-batches from the start
    assert opt.history["step"].max() == 2
    assert set(opt.history["grad_variance"].map(math.isfinite)) == {True}


def test_a_source_with_no_batch_yet_defers_the_check_to_the_first_step_batch():
    class Later:  # a trainer's current batch, set by its hooks later
        batch = None

        def __iter__(self):
            if self.batch is None:
                raise ValueError("no batch yet")
            while True:
                yield self.batch

    torch.manual_seed(0)
    net = nn.Sequential(Fused(), nn.Tanh(), nn.Linear(6, 3))
    opt = _engine(net, recalibrate_every=100, batches=Later())
    opt.zero_grad()
    batch = data(1)[0]
    loss_fn(net, batch).backward()
    opt.step()  # nothing to check yet: the step is taken
    assert opt.steps == 1
    with pytest.raises(PreflightError, match=r"0 \(Fused\)"):
        _step(opt, net, batch)
