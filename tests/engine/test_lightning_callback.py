"""``layerwise.engine.lightning.LayerwiseCallback``: 12-step Lightning runs on CPU.

The callback's run is compared with the plain loop it stands for (``LayerwiseOptimizer`` and
``step(batch)`` by hand) on the same model, data, optimizer and scheduler: the parameters,
the multipliers and the history must agree, and the scheduler's ``lr`` must be the
scheduler's own outside the step.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.nn import functional as F

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import SensitivityController

from .helpers import data, loss_fn, mlp, named_groups

pl = pytest.importorskip("lightning.pytorch")
from layerwise.engine.lightning import LayerwiseCallback, UnsupportedSetupError  # noqa: E402

STEPS, EVERY, LR, GAMMA = 12, 4, 0.05, 0.9


def _controller() -> SensitivityController:
    return SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)


def _optimizer(net):
    opt = torch.optim.SGD(named_groups(net), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: GAMMA**t)
    return opt, sched


class Module(pl.LightningModule):
    def __init__(self, net, *, optimizers: int = 1, manual: bool = False) -> None:
        super().__init__()
        self.net, self.n_optimizers = net, optimizers
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.lr_schedulers().step()
            return None
        return {"loss": loss}

    def configure_optimizers(self):
        opt, sched = _optimizer(self.net)
        if self.n_optimizers > 1:
            other = torch.optim.Adam(self.net.parameters(), lr=1e-3)
            return [opt, other], [sched]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(callback, steps=STEPS, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _loader(batches):
    """The batches as they are, in order (``batch_size=None``: no collation)."""
    return torch.utils.data.DataLoader(batches, batch_size=None)


def _reference(net, batches):
    """The plain loop the callback stands for."""
    base, sched = _optimizer(net)
    opt = LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=_controller(), recalibrate_every=EVERY
    )
    for batch in batches:
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
        sched.step()
    return opt, base


def test_a_12_step_fit_matches_the_plain_loop_and_keeps_the_schedulers_lr():
    batches = data(STEPS)
    net = mlp(dropout=0.0)
    reference_net = copy.deepcopy(net)
    callback = LayerwiseCallback(_controller(), recalibrate_every=EVERY)
    module = Module(net)
    trainer = _trainer(callback)
    trainer.fit(module, train_dataloaders=_loader(batches))
    assert trainer.global_step == STEPS and callback.engine.steps == STEPS
    ref, ref_base = _reference(reference_net, batches)
    # The multipliers moved (so the comparison can fail), and as in the plain loop.
    assert callback.multipliers == ref.multipliers
    assert any(abs(m - 1.0) > 1e-3 for m in callback.multipliers.values())
    for p, q in zip(net.parameters(), reference_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    history = callback.history
    assert sorted(set(history["step"])) == [4, 8, 12]
    assert list(history["group"][:3]) == ["fc0", "fc1", "fc2"]
    # Outside the step, lr is the scheduler's own: LambdaLR's LR * GAMMA^12, unmultiplied.
    (sched_config,) = trainer.lr_scheduler_configs
    base = sched_config.scheduler.optimizer
    assert base is callback.engine.base
    for group, ref_group in zip(base.param_groups, ref_base.param_groups, strict=True):
        assert group["lr"] == pytest.approx(LR * GAMMA**STEPS, rel=1e-12)
        assert group["lr"] == ref_group["lr"]
        assert group["lr_multiplier"] == callback.multipliers[group["name"]]
    logged = trainer.logged_metrics
    for name, m in callback.multipliers.items():
        assert float(logged[f"layerwise/multiplier/{name}"]) == pytest.approx(m)


def test_gradient_accumulation_counts_optimizer_steps():
    """Two batches per optimizer step; recalibrations after warm-up step 1, then every 2."""
    examples: list[int] = []
    callback = LayerwiseCallback(
        _controller(),
        recalibrate_every=2,
        warmup_steps=1,
        callback=lambda record: examples.append(int(record.report.cost.examples)),
    )
    trainer = _trainer(callback, steps=3, accumulate_grad_batches=2)
    trainer.fit(Module(mlp(dropout=0.0)), train_dataloaders=_loader(data(6, size=5)))
    assert trainer.global_step == 3 and callback.engine.steps == 3
    assert sorted(set(callback.history["step"])) == [1, 3]
    assert examples == [5, 5]  # one micro-batch each


def test_manual_optimisation_works_with_a_loss_fn():
    callback = LayerwiseCallback(_controller(), loss_fn, recalibrate_every=EVERY)
    net = mlp(dropout=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    module = Module(net, manual=True)
    trainer = _trainer(callback, steps=STEPS)
    trainer.fit(module, train_dataloaders=_loader(data(STEPS)))
    assert callback.engine.steps == STEPS
    assert sorted(set(callback.history["step"])) == [4, 8, 12]
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def test_manual_optimisation_without_a_loss_fn_is_refused():
    trainer = _trainer(LayerwiseCallback(_controller()))
    with pytest.raises(UnsupportedSetupError, match=r"manual optimisation.*pass"):
        trainer.fit(Module(mlp(), manual=True), train_dataloaders=_loader(data(2)))


def test_several_optimizers_are_refused():
    trainer = _trainer(LayerwiseCallback(_controller(), loss_fn))
    with pytest.raises(UnsupportedSetupError, match="exactly one optimizer, got 2"):
        trainer.fit(Module(mlp(), optimizers=2, manual=True), train_dataloaders=_loader(data(2)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="recalibrate_every"):
        LayerwiseCallback(_controller(), recalibrate_every=0)
    with pytest.raises(ValueError, match="controller must be"):
        LayerwiseCallback(None)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        LayerwiseCallback(_controller(), loss_fn=3)
    with pytest.raises(ValueError, match="estimator: unknown option"):
        LayerwiseCallback(_controller(), estimator={"probez": 3})


def _epoch_trainer(callback, epochs, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def test_fit_from_a_checkpoint_resumes_the_engine(tmp_path):
    """8 steps, a checkpoint, 4 more from it: the same as 12 steps in one go (parameters,
    multipliers, history), since the checkpoint holds the engine's state."""
    batches = _loader(data(4))  # one epoch = 4 steps; stop and resume at an epoch's end
    net = mlp(dropout=0.0)
    whole_net = copy.deepcopy(net)
    whole = LayerwiseCallback(_controller(), recalibrate_every=3)
    _epoch_trainer(whole, 3).fit(Module(whole_net), train_dataloaders=batches)
    first = LayerwiseCallback(_controller(), recalibrate_every=3)
    trainer = _epoch_trainer(first, 2)
    trainer.fit(Module(net), train_dataloaders=batches)
    trainer.save_checkpoint(tmp_path / "eight.ckpt")
    resumed = LayerwiseCallback(_controller(), recalibrate_every=3)
    again = _epoch_trainer(resumed, 3)
    again.fit(Module(net), train_dataloaders=batches, ckpt_path=tmp_path / "eight.ckpt")
    assert resumed.engine.steps == 12 and again.global_step == 12
    assert resumed.multipliers == whole.multipliers
    assert resumed.history["step"].tolist() == whole.history["step"].tolist()
    for p, q in zip(net.parameters(), whole_net.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow  # two spawned interpreters import torch and Lightning: ~20 s on 2 busy cores
def test_ddp_multipliers_are_identical_on_every_rank(tmp_path):
    callback = RankRecorder(
        tmp_path, SensitivityController("curvature", alpha=1.0, max_rel_stderr=math.inf),
        recalibrate_every=2,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, max_epochs=-1,
        callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Module(mlp(dropout=0.0)), train_dataloaders=_loader(data(8)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank trained on its own data
    assert ranks[0]["history"] == ranks[1]["history"]  # step, group, multiplier, traces
    assert any(abs(m - 1.0) > 1e-6 for m in ranks[0]["multipliers"].values())
    assert ranks[0]["multipliers"] == ranks[1]["multipliers"]


class RankRecorder(LayerwiseCallback):
    """Writes each rank's multipliers, history and batch checksums to ``rank{r}.json``."""

    def __init__(self, folder, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.folder, self.sums = str(folder), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.sums.append(float(batch[0].sum()))

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        columns = ["step", "group", "multiplier", "hessian_trace", "grad_norm"]
        record = {
            "steps": self.engine.steps,
            "multipliers": self.multipliers,
            "history": self.history[columns].to_dict("records"),
            "batches": self.sums,
        }
        path = f"{self.folder}/rank{trainer.global_rank}.json"
        with open(path, "w") as f:
            json.dump(record, f)
