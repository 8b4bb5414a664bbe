"""Data regimes of the MNIST-1D tasks (label noise, training-set size, generator arguments),
the update keys of policies and settings (SAM, normalised gradients), and that each reaches
the runs and their manifests."""

from __future__ import annotations

import json

import pytest
import torch

from layerwise.experiments.config import parse_config
from layerwise.experiments.errors import UsageError
from layerwise.experiments.plan import RunSpec, final_specs
from layerwise.experiments.policy_specs import resolve_policy, uses_closure, wrap_optimizer
from layerwise.experiments.tasks import get_task
from layerwise.experiments.tasks.regimes import flip_labels, subsample
from layerwise.experiments.training import execute


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.95])
def test_flip_labels_flips_exactly_the_fraction_to_other_classes(fraction):
    targets = torch.arange(1001) % 7
    noisy = flip_labels(targets, fraction, num_classes=7, seed=3)
    flipped = noisy != targets
    assert int(flipped.sum()) == round(fraction * 1001)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 7 and noisy.dtype == torch.long
    assert torch.equal(noisy, flip_labels(targets, fraction, num_classes=7, seed=3))
    if fraction:
        assert not torch.equal(noisy, flip_labels(targets, fraction, num_classes=7, seed=4))
        # the new class is uniform over the six others: every shift appears
        shifts = ((noisy - targets) % 7)[flipped]
        assert set(shifts.tolist()) == set(range(1, 7))


def test_regime_helpers_refuse_bad_input():
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"label_noise must be a fraction in \[0, 1\), got 1.0"):
        flip_labels(y, 1.0, num_classes=10, seed=0)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        flip_labels(y, 0.1, num_classes=1, seed=0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        flip_labels(y + 5, 0.1, num_classes=3, seed=0)
    with pytest.raises(ValueError, match=r"train_size must be an integer in \[1, 10\], got 11"):
        subsample(y, y, 11, seed=0)
    with pytest.raises(ValueError, match="noise_seed must be an integer >= 0, got -1"):
        get_task("mnist1d_mlp", label_noise=0.1, noise_seed=-1)
    with pytest.raises(ValueError, match="train_size must be None or an integer >= 1, got 0"):
        get_task("mnist1d_cnn", train_size=0)
    with pytest.raises(
        ValueError, match=r"generator: unknown MNIST-1D argument\(s\) \['samples'\]"
    ):
        get_task("mnist1d_mlp", generator={"samples": 10})


def test_mnist1d_regimes_change_the_training_split_only(cache):
    clean = get_task("mnist1d_mlp").data(cache)
    noisy = get_task("mnist1d_mlp", label_noise=0.2, noise_seed=5).data(cache)
    small = get_task("mnist1d_cnn", train_size=500, label_noise=0.3).data(cache)
    n = len(clean.train[1])
    assert torch.equal(noisy.train[0], clean.train[0])
    assert int((noisy.train[1] != clean.train[1]).sum()) == round(0.2 * n)  # exactly
    assert small.sizes() == {"train": 500, "val": 800, "test": 1000}
    for other in (noisy, small):  # validation and test: the same examples, clean labels
        for split in ("val", "test"):
            for a, b in zip(getattr(other, split), getattr(clean, split), strict=True):
                assert torch.equal(a, b)
    # the 500 are a subset of the clean training examples, 30% of their labels flipped
    rows = {tuple(r.tolist()): int(y) for r, y in zip(*clean.train, strict=True)}
    labels = torch.tensor([rows[tuple(r.tolist())] for r in small.train[0]])
    assert int((labels != small.train[1]).sum()) == 150
    task = get_task("mnist1d_mlp", train_size=100, label_noise=0.1)
    assert task.options["train_size"] == 100 and task.options["label_noise"] == 0.1


def test_the_positive_control_model_is_the_plain_mlp_reparametrised(cache):
    """W = c V: the same function as with c = 1, the head's gradient c times larger, and the
    trust ratio ‖V‖/‖∇V‖ c² times smaller (what LARS undoes)."""
    from layerwise.experiments.tasks.mnist1d import ScaledMLP

    torch.manual_seed(0)
    x, y = torch.randn(32, 40, dtype=torch.float64), torch.randint(0, 10, (32,))
    c = 100.0
    plain = get_task("mnist1d_scaled", scale=1.0).build_model(4).double()
    scaled = get_task("mnist1d_scaled", scale=c).build_model(4).double()
    assert isinstance(scaled, ScaledMLP) and type(scaled.head).__name__ == "ScaledLinear"
    torch.testing.assert_close(scaled(x), plain(x), rtol=1e-6, atol=1e-6)
    for net in (plain, scaled):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(
        scaled.head.weight.grad, c * plain.head.weight.grad, rtol=1e-5, atol=0
    )

    def ratio(layer):
        return float(layer.weight.detach().norm() / layer.weight.grad.norm())

    assert ratio(scaled.head) == pytest.approx(ratio(plain.head) / c**2, rel=1e-5)
    task = get_task("mnist1d_scaled")
    assert task.recipe.optimizer == "sgd" and task.options["scaled_layer"] == 3
    with pytest.raises(ValueError, match=r"scaled_layer must be an integer in \[0, 3\]"):
        get_task("mnist1d_scaled", scaled_layer=4)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        get_task("mnist1d_scaled", scale=0.0)


def test_update_keys_of_policies_are_validated_and_wrap_the_optimizer():
    spec = resolve_policy("lars_sam", {"preset": "trust_ratio", "sam": {"rho": 0.1},
                                       "normalize_grads": True})  # fmt: skip
    assert uses_closure(spec) and not uses_closure(resolve_policy("normalized"))
    sgd = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    wrapped = wrap_optimizer(spec, sgd)
    assert type(wrapped).__name__ == "SAM" and wrapped.rho == 0.1
    assert type(wrapped.base).__name__ == "NormalizedGradients" and wrapped.base.base is sgd
    assert wrap_optimizer(resolve_policy("uniform"), sgd) is sgd
    for table, match in (
        ({"sam": 0.05}, r"sam must be a table \{ rho = ... \}"),
        ({"sam": {"rho": 0.1, "adaptive": True}}, "sam must be a table"),
        ({"sam": {"rho": float("inf")}}, "sam.rho must be a positive finite number"),
        ({"normalize_grads": "yes"}, "normalize_grads must be true or false"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_policy("uniform", table)


def _config(settings: dict) -> dict:
    return {
        "seeds": [0],
        "tasks": [{"name": "mnist1d_mlp", "steps": 4, "eval_every": 2, "lr_grid": [0.01]}],
        "policies": {"uniform": {}, "sam": {}},
        "monitor": {"probes": 0},
        "settings": settings,
    }


def test_settings_carry_regimes_and_update_keys_to_every_run():
    settings = {
        "clean": {},
        "noisy": {"options": {"label_noise": 0.2}, "optimizer": "sgd", "momentum": 0.9},
        "normalized": {"normalize_grads": True},
    }
    specs = {s.run_id: s for s in final_specs(parse_config(_config(settings)), {})}
    noisy = specs["final__mnist1d_mlp__uniform__noisy__s0"]
    assert noisy.task_options == {"label_noise": 0.2}
    assert noisy.overrides["optimizer"] == "sgd" and noisy.overrides["momentum"] == 0.9
    assert specs["final__mnist1d_mlp__uniform__clean__s0"].task_options == {}
    assert specs["final__mnist1d_mlp__sam__normalized__s0"].policy_spec == {
        "kind": "uniform", "sam": {"rho": 0.05}, "normalize_grads": True,
    }  # fmt: skip
    for bad, match in (
        ({"x": {"options": {"label_noise": -0.1}}}, "settings.x on tasks.0. .mnist1d_mlp.: "),
        ({"x": {"sam": {"rho": -1}}}, "settings.x: sam.rho must be a positive finite number"),
        ({"x": {"options": [1]}}, "settings.x.options must be a table"),
        ({"x": {"nesterov": True}}, r"settings.x: unknown key\(s\) \['nesterov'\]; known: "),
    ):
        with pytest.raises(UsageError, match=match):
            parse_config(_config(bad))


@pytest.mark.parametrize(
    ("policy", "table", "keys"),
    [
        ("sam", {}, ["sam"]),
        ("normalized", {}, ["normalize_grads"]),
        ("lars_sam", {"preset": "trust_ratio", "recalibrate_every": 2, "warmup_steps": 1,
                      "sam": {"rho": 0.1}, "normalize_grads": True}, ["sam", "normalize_grads"]),
    ],
)  # fmt: skip
def test_a_run_with_a_regime_and_update_keys_records_them_in_its_manifest(
    policy, table, keys, tmp_path, cache
):
    spec = RunSpec(
        kind="final",
        task="mnist1d_mlp",
        task_label="mnist1d_mlp",
        policy=policy,
        setting="noisy",
        seed=1,
        lr=0.01,
        policy_spec=resolve_policy(policy, table),
        task_options={"label_noise": 0.3, "train_size": 200},
        overrides={"steps": 4, "eval_every": 2, "batch_size": 20},
        monitor={"probes": 0},
    )
    summary = execute(spec, tmp_path, cache_dir=cache)
    assert summary["status"] == "ok" and summary["steps"] == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["task"]["options"]["label_noise"] == 0.3
    assert manifest["task"]["data"]["sizes"]["train"] == 200
    assert manifest["spec"]["task_options"] == {"label_noise": 0.3, "train_size": 200}
    for key in keys:
        assert manifest["policy"][key] and manifest["spec"]["policy_spec"][key]
    if policy == "lars_sam":  # the controller recalibrates under SAM and normalisation
        assert summary["recalibrations"] == 2


def test_an_ablation_writes_each_settings_regime_and_update_into_the_manifests(tmp_path, cache):
    from layerwise.experiments.runner import ablate

    raw = _config({"noisy": {"options": {"label_noise": 0.25, "train_size": 400}},
                   "normalized": {"normalize_grads": True}})  # fmt: skip
    raw["policies"] = {"uniform": {}}
    result = ablate(parse_config(raw), tmp_path / "out", progress=False, report=False,
                    cache_dir=cache)  # fmt: skip
    assert not result.failed
    runs = tmp_path / "out" / "runs"
    noisy = json.loads(
        (runs / "final__mnist1d_mlp__uniform__noisy__s0" / "manifest.json").read_text()
    )
    assert noisy["task"]["options"]["label_noise"] == 0.25
    assert noisy["task"]["data"]["sizes"]["train"] == 400
    assert "normalize_grads" not in noisy["policy"]
    other = runs / "final__mnist1d_mlp__uniform__normalized__s0" / "manifest.json"
    normalized = json.loads(other.read_text())
    assert normalized["policy"]["normalize_grads"] is True
    assert normalized["task"]["options"]["label_noise"] == 0.0
    assert noisy["task"]["data"]["sha256"] != normalized["task"]["data"]["sha256"]
