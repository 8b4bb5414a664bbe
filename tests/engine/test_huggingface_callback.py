"""``layerwise.engine.huggingface.LayerwiseCallback``: 12-step Trainer runs on CPU.

With ``optimizers=(opt, sched)`` the Trainer's run is compared with the plain loop it stands
for (``LayerwiseOptimizer`` and ``step(batch)`` by hand, same model, data, optimizer and
scheduler): parameters, multipliers and the scheduler's rate must agree. The Trainer's own
optimizer and scheduler, gradient accumulation, tiny random-initialised BERT and GPT-2, the
logs and the refusals are checked on their own.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import SensitivityController

from .helpers import data, loss_fn, mlp, named_groups

transformers = pytest.importorskip("transformers")
from layerwise.engine.huggingface import LayerwiseCallback, UnsupportedSetupError  # noqa: E402

STEPS, EVERY, LR, GAMMA, BATCH = 12, 4, 0.05, 0.9, 12


def _controller(rule: str = "trust_ratio") -> SensitivityController:
    return SensitivityController(rule, alpha=1.0, max_rel_stderr=math.inf)


class Net(nn.Module):
    """The helpers' MLP behind the Trainer's calling convention: ``model(x=..., labels=...)``
    returns a dict with the mean cross-entropy as ``"loss"``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _examples(batches):
    return [{"x": x[i], "labels": y[i]} for x, y in batches for i in range(len(y))]


def _args(tmp_path, steps=STEPS, **kwargs):
    settings = {
        "output_dir": str(tmp_path),
        "max_steps": steps,
        "per_device_train_batch_size": BATCH,
        "train_sampling_strategy": "sequential",
        "learning_rate": LR,
        "max_grad_norm": 0.0,
        "logging_steps": EVERY,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        **kwargs,
    }
    return transformers.TrainingArguments(**settings)


def _optimizer(net):
    opt = torch.optim.SGD(named_groups(net), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: GAMMA**t)
    return opt, sched


def _reference(net, batches):
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


def test_a_12_step_run_with_the_users_optimizer_matches_the_plain_loop(tmp_path):
    batches = data(STEPS, size=BATCH)
    net = mlp(dropout=0.0)
    reference_net = copy.deepcopy(net)
    opt, sched = _optimizer(net)
    callback = LayerwiseCallback(_controller(), recalibrate_every=EVERY)
    trainer = transformers.Trainer(
        model=Net(net),
        args=_args(tmp_path),
        train_dataset=_examples(batches),
        optimizers=(opt, sched),
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == STEPS and callback.engine.steps == STEPS
    assert callback.engine.base is opt
    assert trainer.optimizer.optimizer is opt  # unwrapped again after training
    ref, ref_base = _reference(reference_net, batches)
    assert callback.multipliers == pytest.approx(ref.multipliers, rel=1e-6)
    assert any(abs(m - 1.0) > 1e-3 for m in callback.multipliers.values())
    for p, q in zip(net.parameters(), reference_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert sorted(set(callback.history["step"])) == [4, 8, 12]
    # Outside the step, lr is the scheduler's own (LR * GAMMA^12), unmultiplied.
    for group, ref_group in zip(opt.param_groups, ref_base.param_groups, strict=True):
        assert group["lr"] == pytest.approx(LR * GAMMA**STEPS, rel=1e-12)
        assert group["lr"] == ref_group["lr"]
    # The multipliers are logged under the group names at each log event.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [4, 8, 12]
    final = logged[-1]
    for name, m in callback.multipliers.items():
        assert final[f"layerwise/multiplier/{name}"] == m


def test_the_trainers_own_optimizer_and_scheduler_with_accumulation(tmp_path):
    """The Trainer builds AdamW (two groups, with and without decay) and a linear schedule;
    two micro-batches per optimizer step."""
    examples_seen: list[int] = []
    callback = LayerwiseCallback(
        _controller(),
        recalibrate_every=3,
        callback=lambda record: examples_seen.append(int(record.report.cost.examples)),
    )
    trainer = transformers.Trainer(
        model=Net(mlp(dropout=0.0)),
        args=_args(
            tmp_path,
            steps=6,
            gradient_accumulation_steps=2,
            weight_decay=0.01,
            per_device_train_batch_size=6,
        ),
        train_dataset=_examples(data(6, size=BATCH)),
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == 6 and callback.engine.steps == 6
    assert sorted(set(callback.history["step"])) == [3, 6]
    assert set(callback.multipliers) == {"group0", "group1"}
    scheduled = trainer.lr_scheduler.get_last_lr()
    assert [g["lr"] for g in callback.engine.base.param_groups] == scheduled
    # Each estimate ran on the window's last micro-batch (6 examples), not on 12.
    assert examples_seen == [6, 6]


def _tiny(kind: str):
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=3,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(4 * STEPS):
        ids = torch.randint(1, 40, (8,), generator=g)
        mask = torch.ones(8, dtype=torch.long)
        mask[8 - i % 3 :] = 0  # padding at the end of some sequences
        label = torch.tensor(i % 3) if kind == "bert" else ids.masked_fill(mask == 0, -100)
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": label})
    return model, examples


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_tiny_transformers_train_12_steps_with_layerwise_groups(kind, tmp_path):
    torch.manual_seed(0)
    model, examples = _tiny(kind)
    blocks = "bert.encoder.layer" if kind == "bert" else "transformer.h"
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        key = "rest"
        if name.startswith(blocks + "."):
            key = "block" + name[len(blocks) + 1 :].split(".")[0]
        groups.setdefault(key, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "name": k} for k, ps in groups.items()], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * STEPS))
    callback = LayerwiseCallback(
        _controller("curvature"), recalibrate_every=EVERY, estimator={"probes": 2}
    )
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=4, learning_rate=1e-3),
        train_dataset=examples,
        optimizers=(opt, sched),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.engine.steps == STEPS
    history = callback.history
    assert sorted(set(history["step"])) == [4, 8, 12]
    assert set(history["group"]) == {"rest", "block0", "block1"}
    assert history["hessian_trace"].notna().all() and not history["skipped"].any()
    assert all(math.isfinite(m) and m > 0 for m in callback.multipliers.values())
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="recalibrate_every"):
        LayerwiseCallback(_controller(), recalibrate_every=0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        LayerwiseCallback(_controller(), loss_fn="loss")
    net = mlp(dropout=0.0)
    opt, sched = _optimizer(net)
    wrapped = LayerwiseOptimizer(opt)
    trainer = transformers.Trainer(
        model=Net(net),
        args=_args(tmp_path, steps=2),
        train_dataset=_examples(data(2, size=BATCH)),
        optimizers=(wrapped, sched),
        callbacks=[LayerwiseCallback(_controller())],
    )
    with pytest.raises(UnsupportedSetupError, match="already a LayerwiseOptimizer"):
        trainer.train()


def test_a_batch_without_labels_names_the_loss(tmp_path):
    """The default loss is model(**batch).loss; a model that returns none says so."""
    batches = data(2, size=BATCH)
    unlabelled = [{"x": x[i]} for x, _ in batches for i in range(BATCH)]

    class Labelled(Net):  # trains on fixed labels, as a custom compute_loss might
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            if self.training and torch.is_grad_enabled() and labels is None:
                out["train_loss"] = out["logits"].square().mean()
            return out

    class Trainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return model(**inputs)["train_loss"]

    trainer = Trainer(
        model=Labelled(mlp(dropout=0.0)),
        args=_args(tmp_path, steps=2),
        train_dataset=unlabelled,
        callbacks=[LayerwiseCallback(_controller(), recalibrate_every=1)],
    )
    with pytest.raises(ValueError, match=r"loss_fn: model\(\*\*batch\) gave no scalar loss"):
        trainer.train()


class StartRecorder(LayerwiseCallback):
    """Records the multipliers the engine starts from."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        self.start = dict(self.multipliers)


def test_resuming_a_run_brings_the_multipliers_back(tmp_path):
    """The Trainer loads the optimizer's state before any callback runs, into the base
    optimizer: the multipliers come back with its groups; the engine's count restarts."""
    batches = data(8, size=BATCH)

    def run(callback, steps, resume=None):
        net = mlp(dropout=0.0)
        opt, sched = _optimizer(net)
        args = _args(tmp_path, steps=steps, save_strategy="steps", save_steps=4)
        trainer = transformers.Trainer(
            model=Net(net),
            args=args,
            train_dataset=_examples(batches),
            optimizers=(opt, sched),
            callbacks=[callback],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = LayerwiseCallback(_controller(), recalibrate_every=4)
    run(first, 4)
    assert any(abs(m - 1.0) > 1e-3 for m in first.multipliers.values())
    resumed = StartRecorder(_controller(), recalibrate_every=4)
    trainer = run(resumed, 8, resume=str(tmp_path / "checkpoint-4"))
    assert trainer.state.global_step == 8
    assert resumed.start == first.multipliers
    assert resumed.engine.steps == 4 and sorted(set(resumed.history["step"])) == [4]


#: One rank of a 2-process Trainer run under torch.distributed.run (gloo, CPU): each rank
#: trains on its own half of the data and writes what the engine decided.
DDP_WORKER = """
import json, math, os, sys
import torch, transformers
from torch import nn
from torch.nn import functional as F
from layerwise.engine.huggingface import LayerwiseCallback
from layerwise.policies import SensitivityController

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 3)
    def forward(self, x, labels=None):
        logits = self.b(torch.tanh(self.a(x)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}

g = torch.Generator().manual_seed(1)
train = [{"x": torch.randn(6, generator=g), "labels": int(i % 3)} for i in range(64)]
net = Net()
opt = torch.optim.SGD([{"params": net.a.parameters(), "name": "a"},
                       {"params": net.b.parameters(), "name": "b"}], lr=0.05)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)
controller = SensitivityController("curvature", alpha=1.0, max_rel_stderr=math.inf)
callback = LayerwiseCallback(controller, recalibrate_every=2)
seen = []
class Seen(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        seen.append(float(callback._current.batch["x"].sum()))
args = transformers.TrainingArguments(
    sys.argv[1], max_steps=4, per_device_train_batch_size=8, report_to=[], use_cpu=True,
    save_strategy="no", disable_tqdm=True, ddp_backend="gloo", max_grad_norm=0.0,
)
trainer = transformers.Trainer(model=net, args=args, train_dataset=train,
                               optimizers=(opt, sched), callbacks=[callback, Seen()])
trainer.train()
rank = torch.distributed.get_rank()
columns = ["step", "group", "multiplier", "hessian_trace", "grad_norm"]
record = {"steps": callback.engine.steps, "multipliers": callback.multipliers,
          "history": callback.history[columns].to_dict("records"), "batches": seen,
          "world": torch.distributed.get_world_size()}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.mark.slow  # two fresh interpreters import torch and transformers: ~30 s on 2 busy cores
def test_ddp_multipliers_are_identical_on_every_rank(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), str(tmp_path)]  # fmt: skip
    # A session of its own, so that a timeout ends torchrun's workers too, not only torchrun.
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank trained on its own data
    assert ranks[0]["history"] == ranks[1]["history"]
    assert any(abs(m - 1.0) > 1e-6 for m in ranks[0]["multipliers"].values())
    assert ranks[0]["multipliers"] == ranks[1]["multipliers"]
