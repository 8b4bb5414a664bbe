"""The bundled positive control (``layerwise ablate control``): fair by construction (both
policies tuned on the same grid, seeds, budget and schedule; the LARS policy is the
trust_ratio preset at alpha = 1 with bounds wide enough for the reparametrisation), and
enough seeds for a paired test."""

from __future__ import annotations

import re
from pathlib import Path

from layerwise.experiments.commands.ablate import resolve_config_path
from layerwise.experiments.config import load_config
from layerwise.experiments.plan import final_specs, lr_grid, planned_run_ids, tuning_specs
from layerwise.experiments.policy_specs import build_controller


def test_the_control_tunes_both_policies_alike_and_lets_lars_undo_the_scale():
    config = load_config(resolve_config_path("control"))
    assert set(config.policies) == {"uniform", "lars"} and len(config.seeds) >= 6
    assert len(config.tuning_seeds) >= 2
    grids = lr_grid(config)
    assert len(set(grids.values())) == 1, "the same grid for every policy"
    (grid,) = set(grids.values())
    assert len(grid) >= 6 and max(grid) / min(grid) >= 1e3
    tuning = tuning_specs(config)
    for policy in config.policies:
        mine = [(s.lr, s.seed, s.overrides["steps"], str(s.schedule)) for s in tuning
                if s.policy == policy]  # fmt: skip
        assert sorted(mine) == sorted(
            (s.lr, s.seed, s.overrides["steps"], str(s.schedule)) for s in tuning
            if s.policy == "uniform"
        )  # fmt: skip
    lars = config.policies["lars"]
    assert lars["kind"] == "controller" and lars["rule"] == "trust_ratio"
    controller = build_controller(lars)
    assert controller.alpha == 1.0  # LARS's ratio exactly
    scale = config.tasks[0].options["scale"]
    assert controller.bounds.max_spread >= 10 * scale**2  # room for the 1/scale² it must find
    assert controller.bounds.min_multiplier <= 1 / scale**2
    runs = len(grid) * len(config.tuning_seeds) + len(config.seeds)
    assert len(planned_run_ids(config)) == 2 * runs


def test_the_readme_settings_example_is_a_valid_config(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    head = (
        'seeds = [0]\npolicies = ["uniform"]\n[[tasks]]\nname = "mnist1d_mlp"\nlr_grid = [0.01]\n'
    )
    (tmp_path / "c.toml").write_text(head + block)
    specs = {s.setting: s for s in final_specs(load_config(tmp_path / "c.toml"), {})}
    assert specs["noise20"].task_options == {"label_noise": 0.2}
    assert specs["sgdm_sam"].policy_spec["sam"] == {"rho": 0.05}
    assert specs["sgdm_sam"].overrides["optimizer"] == "sgd"
