"""Controller policies of an ablation config: the controller table keeps its flat keys
(``controller = { alpha = 0.5, max_spread = 4 }``), also takes nested ``bounds``/``safety``
tables, and refuses unknown keys and bad estimator settings when the config is read."""

from __future__ import annotations

import pytest

from layerwise.experiments.policy_specs import build_controller, build_policy, resolve_policy
from layerwise.policies import Bounds, Safety, group_parameters
from layerwise.sensitivity import EstimateOptions


def test_flat_controller_keys_reach_the_controller():
    # [policies.curvature] controller = { alpha = 0.25, max_spread = 2 }
    spec = resolve_policy("curvature", {"controller": {"alpha": 0.25, "max_spread": 2}})
    ctrl = build_controller(spec)
    assert ctrl.alpha == 0.25 and ctrl.bounds == Bounds(max_spread=2.0)
    assert ctrl.safety == Safety(mode="max")  # the presets' validation mode is kept


def test_nested_tables_override_the_presets_flat_keys():
    # [policies.curvature] controller = { safety = { mode = "min", patience = 9 } }
    spec = resolve_policy("curvature", {"controller": {"safety": {"mode": "min", "patience": 9}}})
    assert spec["controller"] == {"mode": "min", "patience": 9}
    assert build_controller(spec).safety == Safety(mode="min", patience=9)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"controller": {"max_sprad": 4}}, r"policy 'curvature': controller: unknown key\(s\) "),
        ({"controller": {"bounds": {"spread": 4}}}, r"bounds: unknown key\(s\) \['spread'\]"),
        ({"controller": {"rule": "noise"}}, "'rule' belongs to the policy"),
        ({"controller": {"cooldown": -1}}, "cooldown must be >= 0, got -1"),
        ({"estimator": {"probes": 0}}, "probes must be >= 1, got 0"),
        ({"estimator": {"dtype": "float99"}}, "dtype must name a torch dtype"),
        ({"estimator": {"seed": 1}}, r"estimator: \['seed'\] are set by the engine"),
    ],
)
def test_bad_controller_or_estimator_keys_are_refused_with_the_config(table, match):
    with pytest.raises(ValueError, match=match):
        resolve_policy("curvature", table)


def test_build_policy_hands_the_engine_estimator_settings_it_accepts():
    import torch

    spec = resolve_policy("noise", {"estimator": {"probes": 3, "variance": "micro_batch"}})
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    built = build_policy(spec, group_parameters(model, "depth"))
    assert built["controller"].rule.name == "noise"
    assert EstimateOptions.from_dict(built["estimator"]).probes == 3
