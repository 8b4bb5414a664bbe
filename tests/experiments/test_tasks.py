"""The bundled tasks: real data of the documented sizes, seeded models, the loss contract,
user tasks by import path, and clear errors."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from layerwise.experiments.errors import UsageError
from layerwise.experiments.tasks import TASKS, Budget, Recipe, Splits, Task, get_task, holdout
from layerwise.experiments.tasks.sequence import generate_query_count
from layerwise.sensitivity import CrossEntropy, estimate

# Small options keep the transfer task's pre-training short in tests.
OPTIONS = {"transfer_mnist1d": {"pretrain_steps": 5}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_contract(name, cache):
    task = get_task(name, **OPTIONS.get(name, {}))
    assert task.name == name and task.description
    splits = task.data(cache)
    sizes = splits.sizes()
    assert all(n > 0 for n in sizes.values())
    model_a, model_b = task.build_model(3), task.build_model(3)
    for (na, pa), (nb, pb) in zip(
        model_a.named_parameters(), model_b.named_parameters(), strict=True
    ):
        assert na == nb and torch.equal(pa, pb), "same seed must give the same weights"
    other = task.build_model(4)
    assert any(
        not torch.equal(p, q) for p, q in zip(model_a.parameters(), other.parameters(), strict=True)
    )
    x, y = splits.train
    loss = task.loss_fn(model_a, (x[:16], y[:16]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    # the loss is a loss object: the Gauss-Newton trace is available on every bundled task
    assert isinstance(task.loss_fn, CrossEntropy)
    ggn = estimate(model_a, task.loss_fn, (x[:8], y[:8]), quantities=["ggn_trace"], ggn_samples=2)
    assert ggn.is_finite() and all(g.ggn_trace >= 0 for g in ggn)
    val_loss, val_metric = task.evaluate(model_a, *splits.val, chunk=100)
    assert 0.0 <= float(val_metric) <= 1.0 and torch.isfinite(val_loss)
    # the head patterns name exactly the output layer
    from layerwise import policies

    groups = policies.group_parameters(model_a, head=list(task.head))
    assert [g.role for g in groups][-1] == "head"
    assert sum(g.role == "head" for g in groups) == 1


def test_mnist1d_has_the_paper_sizes_and_models(cache):
    state = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    splits = get_task("mnist1d_mlp").data(cache)
    assert np.array_equal(np.random.get_state()[1], state[0])  # noqa: NPY002
    assert random.getstate() == state[1]
    assert splits.sizes() == {"train": 3200, "val": 800, "test": 1000}  # 4000 = 3200 + 800
    assert splits.train[0].shape[1] == 40 and int(splits.train[1].max()) == 9
    # MLP 40-100-100-10: 4100 + 10100 + 1010; CNN: 150 + 1900 + 1900 + 1260
    assert sum(p.numel() for p in get_task("mnist1d_mlp").build_model(0).parameters()) == 15210
    assert sum(p.numel() for p in get_task("mnist1d_cnn").build_model(0).parameters()) == 5210
    assert list(dict(get_task("mnist1d_cnn").build_model(0).named_children())) == [
        "conv1",
        "conv2",
        "conv3",
        "linear",
    ]
    # train and validation are disjoint (no signal appears in both)
    train = {tuple(row.tolist()) for row in splits.train[0][:500]}
    assert not any(tuple(row.tolist()) in train for row in splits.val[0])
    assert list(cache.glob("mnist1d-*.npz")), "the generated data are cached on disk"


def test_transfer_uses_the_pretrained_trunk_and_digits_5_to_9(cache):
    task = get_task("transfer_mnist1d", **OPTIONS["transfer_mnist1d"])
    splits = task.data(cache)
    assert splits.sizes()["train"] == 500 and splits.sizes()["val"] == 400
    for _, y in (splits.train, splits.val, splits.test):
        assert int(y.min()) >= 0 and int(y.max()) <= 4  # digits 5-9 relabelled 0-4
    a, b = task.build_model(0), task.build_model(1)
    assert torch.equal(a.conv1.weight, b.conv1.weight), "every run starts from the same trunk"
    assert not torch.equal(a.linear.weight, b.linear.weight), "the head is drawn per seed"
    fresh = get_task("mnist1d_cnn").build_model(0)
    assert not torch.equal(a.conv1.weight, fresh.conv1.weight)


def test_query_count_labels_and_determinism():
    x, y = generate_query_count(200, 16, 8, 5, seed=7)
    assert ((x[:, 1:] == x[:, :1]).sum(axis=1) == y).all()
    assert set(np.unique(y)) == set(range(5))
    x2, y2 = generate_query_count(200, 16, 8, 5, seed=7)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    with pytest.raises(ValueError, match="vocab"):
        generate_query_count(5, 16, 1, 5, seed=0)


def test_data_hash_sees_every_tensor():
    t = torch.arange(10.0)
    s1 = Splits((t, t.long()), (t, t.long()), (t, t.long()))
    s2 = Splits((t, t.long()), (t, t.long()), (t + 1e-6, t.long()))
    assert s1.sha256() == Splits((t.clone(), t.long()), (t, t.long()), (t, t.long())).sha256()
    assert s1.sha256() != s2.sha256()


def _user_task() -> Task:
    base = get_task("digits_mlp")
    return Task(
        name="mine",
        description="a user task",
        build_model=base.build_model,
        load_data=base.load_data,
        budget=Budget(10, 8, 5, 0.5),
        recipe=Recipe(),
    )


def test_user_task_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        "from tests.experiments.test_tasks import _user_task\n"
        "def factory(): return _user_task()\n"
        "OBJECT = _user_task()\n"
        "def broken(): return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_task("my_tasks:factory").name == "mine"
    assert get_task("my_tasks:OBJECT").budget.steps == 10
    with pytest.raises(UsageError, match="returned int, not a Task"):
        get_task("my_tasks:broken")
    with pytest.raises(UsageError, match="takes no options"):
        get_task("my_tasks:OBJECT", size=3)
    with pytest.raises(UsageError, match="cannot import module"):
        get_task("no_such_module_xyz:factory")
    sys.modules.pop("my_tasks", None)


def test_errors_name_the_argument():
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(UsageError, match="bad options"):
        get_task("digits_mlp", no_such_option=1)
    with pytest.raises(ValueError, match="unknown override"):
        get_task("digits_mlp").with_overrides(stepz=3)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        get_task("digits_mlp").with_overrides(steps=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Recipe(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr_grid"):
        Recipe(lr_grid=(0.1, -1.0))
    with pytest.raises(ValueError, match="fraction"):
        holdout(torch.zeros(10), torch.zeros(10), 1.5, seed=0)
    with pytest.raises(ValueError, match="finetune_train"):
        get_task("transfer_mnist1d", finetune_train=0)
    with pytest.raises(TypeError, match="train must hold tensors"):
        Splits(([1], [1]), (torch.zeros(1), torch.zeros(1)), (torch.zeros(1), torch.zeros(1)))


def test_a_custom_criterion_gives_a_plain_loss_function():
    import dataclasses

    base = get_task("digits_mlp")
    task = dataclasses.replace(base, criterion=lambda out, y: 2 * torch.nn.functional.l1_loss(
        out.softmax(-1), torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)))  # fmt: skip
    model = task.build_model(0)
    x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
    assert not isinstance(task.loss_fn, CrossEntropy)
    assert torch.equal(task.loss_fn(model, (x, y)), task.criterion(model(x), y))
    assert torch.equal(base.loss_fn(model, (x, y)), torch.nn.functional.cross_entropy(model(x), y))
