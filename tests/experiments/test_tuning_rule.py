"""The tuning rule: failed rates last, mean over seeds, geometric extension to a cap,
tuning.json contents, and a resumed tuning replaying the same decisions."""

from __future__ import annotations

import math

import pytest

from layerwise.experiments.config import parse_config
from layerwise.experiments.errors import UsageError
from layerwise.experiments.plan import planned_run_ids, tuning_specs
from layerwise.experiments.tuning import (
    RateScore,
    Tuner,
    TuningRule,
    extended_grids,
    is_bracketed,
    next_rate,
    rank_rates,
    run_failed,
)

KEY = ("toy", "default", "uniform")


def _ok(metric, loss=0.5, best=None):
    best = metric if best is None else best
    return {"status": "ok", "val_metric": metric, "val_loss": loss, "best_val_metric": best}


def _score(lr, *seeds, failed=(False, False), loss=0.5):
    per_seed = {
        i: {**_ok(m, loss), "failed": f} for i, (m, f) in enumerate(zip(seeds, failed, strict=True))
    }
    return RateScore(lr, per_seed)


def _drive(tuner, landscape):
    """Run the tuner to the end, each run's outcome ``landscape(lr, seed)``; returns the
    chosen rate and the runs in the order they were asked for."""
    queue, asked, chosen = list(tuner.start()), [], None
    while queue:
        key, lr, seed = queue.pop(0)
        asked.append((lr, seed))
        more, lr_chosen = tuner.record(key, lr, seed, landscape(lr, seed))
        queue += more
        chosen = lr_chosen if lr_chosen is not None else chosen
    return chosen, asked


def test_failed_runs():
    assert run_failed({"status": "diverged", "val_metric": 0.9, "best_val_metric": 0.9})
    assert run_failed(_ok(math.nan))
    assert run_failed(_ok(0.6, best=0.9))  # lost a third of its best: collapsed late
    assert not run_failed(_ok(0.7, best=0.9))  # lost 22%: within the default 25%
    assert run_failed(_ok(0.7, best=0.9), collapse_drop=0.2)


def test_ranking_by_mean_with_failures_last():
    scores = {
        0.1: _score(0.1, 0.95, 0.95, failed=(True, False)),
        0.03: _score(0.03, 0.80, 0.88),
        0.01: _score(0.01, 0.86, 0.86),
        0.003: _score(0.003, 0.85, 0.85, loss=0.4),
        0.001: _score(0.001, 0.85, 0.85, loss=0.4),
    }
    # means: 0.01 -> 0.86, then a tie at 0.85 (same loss) goes to the smaller rate, then 0.03
    # -> 0.84; 0.1 failed on one seed, so it is last despite the best mean
    assert rank_rates(scores) == [0.01, 0.001, 0.003, 0.03, 0.1]


def test_next_rate_uses_the_grid_ratio_at_the_edge_or_the_factor():
    assert next_rate([0.001, 0.01, 0.02], 0.02) == 0.04
    assert next_rate([0.001, 0.01, 0.02], 0.001) == 0.0001
    assert next_rate([0.001, 0.01], 0.01, extend_factor=2) == 0.02
    with pytest.raises(ValueError, match="not at an edge"):
        next_rate([0.001, 0.003, 0.01], 0.003)
    assert is_bracketed([1, 2, 3], 2) and not is_bracketed([1, 2, 3], 3)


def test_extends_up_until_bracketed():
    # accuracy peaks at lr 0.1: the grid [0.001, 0.003, 0.01] extends up twice (x ~3.33)
    def landscape(lr, seed):
        return _ok(1.0 - abs(math.log10(lr) - math.log10(0.1)) / 10 + 0.001 * seed)

    tuner = Tuner({KEY: (0.001, 0.003, 0.01)}, TuningRule(seeds=(7, 8)))
    chosen, asked = _drive(tuner, landscape)
    cell = tuner.to_json()["cells"]["toy/default/uniform"]
    assert cell["grid"] == [0.001, 0.003, 0.01, 0.0333333, 0.111111, 0.37037]
    assert chosen == cell["chosen_lr"] == 0.111111 and cell["bracketed"] is True
    assert [e["side"] for e in cell["extensions"]] == ["up", "up", "up"]
    assert len(asked) == 2 * 6, "every rate on both tuning seeds"
    scores = cell["scores"]["0.111111"]
    assert set(scores["per_seed"]) == {"7", "8"} and scores["rank"] == 1
    first = scores["per_seed"]["7"]["val_metric"]
    assert scores["val_metric"] == pytest.approx((2 * first + 0.001) / 2)


def test_divergence_past_the_edge_brackets_from_above():
    def landscape(lr, seed):
        if lr > 0.02:
            return {"status": "diverged", "val_metric": math.nan, "val_loss": math.nan}
        return _ok(0.5 + lr)

    tuner = Tuner({KEY: (0.001, 0.003, 0.01)}, TuningRule())
    chosen, _ = _drive(tuner, landscape)
    cell = tuner.to_json()["cells"]["toy/default/uniform"]
    assert chosen == 0.01 and cell["bracketed"] is True
    assert cell["scores"]["0.0333333"]["failed"] is True


def test_cap_reached_is_reported_not_bracketed():
    tuner = Tuner({KEY: (0.001, 0.01)}, TuningRule(seeds=(1, 2), max_extensions=2))
    chosen, _ = _drive(tuner, lambda lr, seed: _ok(lr))  # higher is always better
    cell = tuner.to_json()["cells"]["toy/default/uniform"]
    assert cell["grid"] == [0.001, 0.01, 0.1, 1.0] and chosen == 1.0
    assert cell["bracketed"] is False and cell["status"] == "done"


def test_a_late_collapse_on_one_seed_ranks_last():
    def landscape(lr, seed):
        if lr == 0.01 and seed == 2:
            return _ok(0.3, best=0.95)  # best on the mean of the finals, but collapsed
        return _ok(0.9 if lr == 0.003 else 0.85)

    tuner = Tuner({KEY: (0.001, 0.003, 0.01)}, TuningRule(seeds=(1, 2)))
    chosen, _ = _drive(tuner, landscape)
    assert chosen == 0.003


def test_a_raising_run_fails_the_cell():
    tuner = Tuner({KEY: (0.001, 0.01)}, TuningRule(seeds=(1,)))
    (run_a, run_b) = tuner.start()
    assert tuner.record(*run_a, None) == ([], None)
    assert tuner.record(*run_b, _ok(0.9)) == ([], None)
    assert tuner.to_json()["cells"]["toy/default/uniform"]["status"] == "failed"


def test_resume_replays_the_same_decisions():
    def landscape(lr, seed):
        return _ok(lr)

    first = Tuner({KEY: (0.001, 0.01)}, TuningRule(seeds=(1, 2)))
    _, asked = _drive(first, landscape)
    second = Tuner({KEY: (0.001, 0.01)}, TuningRule(seeds=(1, 2)))
    _, again = _drive(second, landscape)
    assert asked == again and first.to_json() == second.to_json()
    assert extended_grids(first.to_json()) == {KEY: [0.001, 0.01, 0.1, 1.0, 10.0]}


CONFIG = {
    "seeds": [0, 1],
    "tasks": [{"name": "digits_mlp", "label": "toy", "lr_grid": [0.001, 0.01]}],
    "policies": ["uniform"],
}


def test_config_tuning_section():
    config = parse_config(CONFIG)
    assert config.tuning == TuningRule() and config.tuning_seeds == (1000, 1001)
    config = parse_config({**CONFIG, "tuning": {"max_extensions": 0, "seeds": [5]}})
    assert config.tuning.max_extensions == 0 and config.tuning_seeds == (5,)
    with pytest.raises(UsageError, match=r"tuning\.max_extensions must be an integer in"):
        parse_config({**CONFIG, "tuning": {"max_extensions": -1}})
    message = r"tuning\.extend_factor must be a number in \(1, 100\], got 1"
    with pytest.raises(UsageError, match=message):
        parse_config({**CONFIG, "tuning": {"extend_factor": 1}})
    with pytest.raises(UsageError, match="unknown key"):
        parse_config({**CONFIG, "tuning": {"cap": 3}})


def test_planned_runs_follow_the_extended_grid():
    config = parse_config(CONFIG)
    grids = {KEY: [0.001, 0.01, 0.1]}
    ids = planned_run_ids(config, grids)
    assert "tune__toy__uniform__default__lr0.1__s1001" in ids
    assert len(tuning_specs(config, grids)) == 6
    assert len(planned_run_ids(config)) == 4 + 2


def test_ablation_extends_reports_and_resumes(tmp_path):
    """Through the runner: a too-low grid extends up, the extension run is planned (the report
    accepts it), and a second ablate replays the decisions without running anything."""
    import json

    from layerwise.experiments.results import load_results
    from layerwise.experiments.runner import ablate

    raw = {
        "seeds": [0, 1],
        "tasks": [
            {
                "name": "digits_mlp",
                "label": "toy",
                "steps": 20,
                "batch_size": 32,
                "eval_every": 10,
                "lr_grid": [1e-5, 3e-5],
            }
        ],
        "policies": ["uniform"],
        "tuning": {"seeds": [100], "max_extensions": 1},
        "monitor": {"probes": 0},
    }
    config = parse_config(raw)
    out = tmp_path / "out"
    first = ablate(config, out, progress=False, report=False)
    cell = json.loads((out / "tuning.json").read_text())["cells"]["toy/default/uniform"]
    assert cell["grid"] == [1e-5, 3e-5, 9e-5] and cell["extensions"][0]["side"] == "up"
    assert cell["bracketed"] is False, "still rising at the cap: reported, not hidden"
    assert (out / "runs" / "tune__toy__uniform__default__lr9e-05__s100").is_dir()
    assert first.ran == first.total == 3 + 2
    results = load_results(out)  # strict: every run folder is a planned one
    assert len(results.runs) == 5 and not results.problems
    again = ablate(config, out, progress=False, report=False)
    assert again.ran == 0 and again.skipped == 5
