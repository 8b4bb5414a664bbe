"""The controller's settings as plain data: flat config keys, the nested form of to_dict,
the Bounds and Safety objects, and clear errors for anything else."""

from __future__ import annotations

import json
import math

import pytest

from layerwise.policies import Bounds, Safety, SensitivityController
from layerwise.sensitivity import GroupEstimate, SensitivityReport

FLAT_KEYS = [
    "rule", "alpha", "min_multiplier", "max_multiplier", "max_spread", "max_change", "ema",
    "max_rel_stderr", "spike_factor", "spike_ema", "cooldown", "hysteresis", "patience", "mode",
    "min_delta", "collapse_drop", "collapse_patience",
]  # fmt: skip


def _report(**traces: float) -> SensitivityReport:
    return SensitivityReport([GroupEstimate(n, 10, hessian_trace=t) for n, t in traces.items()])


def test_flat_config_keys_build_the_same_controller_as_the_objects():
    table = {"alpha": 1.0, "max_spread": 4, "mode": "max"}  # controller = { ... } in TOML
    built = SensitivityController.from_dict({"rule": "noise", **table})
    direct = SensitivityController(
        "noise", alpha=1.0, bounds=Bounds(max_spread=4.0), safety=Safety(mode="max")
    )
    assert built.settings == direct.settings
    assert built.bounds == Bounds(max_spread=4.0) and built.safety == Safety(mode="max")
    assert isinstance(built.bounds.max_spread, float)


def test_settings_keep_their_flat_keys_and_order():
    ctrl = SensitivityController()
    assert list(ctrl.settings) == FLAT_KEYS
    assert ctrl.settings["max_spread"] == 4.0 and ctrl.settings["mode"] == "min"


def test_to_dict_is_nested_plain_data_and_from_dict_inverts_it():
    ctrl = SensitivityController(
        "curvature+noise", alpha=1.0, ema=0.0, max_rel_stderr=math.inf,
        bounds=Bounds(min_multiplier=0.5, max_change=2.0), safety=Safety(cooldown=0, patience=5),
    )  # fmt: skip
    data = ctrl.to_dict()
    assert data["bounds"] == {
        "min_multiplier": 0.5, "max_multiplier": 10.0, "max_spread": 4.0, "max_change": 2.0,
    }  # fmt: skip
    assert data["safety"]["cooldown"] == 0 and data["safety"]["patience"] == 5
    again = SensitivityController.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data and again.settings == ctrl.settings
    assert SensitivityController.from_dict(ctrl.settings).to_dict() == data


def test_flat_and_nested_keys_mix_but_a_field_given_twice_is_refused():
    mixed = SensitivityController.from_dict({"bounds": {"max_spread": 2.0}, "max_change": 3.0})
    assert mixed.bounds == Bounds(max_spread=2.0, max_change=3.0)
    with pytest.raises(ValueError, match=r"\['max_spread'\] given both flat and under 'bounds'"):
        SensitivityController.from_dict({"bounds": {"max_spread": 2.0}, "max_spread": 3.0})


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"max_sprad": 4}, ValueError, r"controller: unknown key\(s\) \['max_sprad'\]; known: "),
        ({"bounds": {"spread": 4}}, ValueError, r"bounds: unknown key\(s\) \['spread'\]"),
        ({"safety": {"cool": 1}}, ValueError, r"safety: unknown key\(s\) \['cool'\]"),
        ({"bounds": 4}, TypeError, "bounds must be a Bounds or a mapping, got 4"),
        ([("alpha", 1.0)], TypeError, r"controller settings must be a mapping, got \["),
    ],
)
def test_from_dict_errors_name_the_key(data, error, match):
    with pytest.raises(error, match=match):
        SensitivityController.from_dict(data)


def test_constructor_takes_only_the_settings_objects():
    with pytest.raises(TypeError, match=r"bounds must be a policies\.Bounds, got \{'max_spread'"):
        SensitivityController(bounds={"max_spread": 4.0})
    with pytest.raises(TypeError, match=r"safety must be a policies\.Safety, got 3"):
        SensitivityController(safety=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_spread'"):
        SensitivityController(max_spread=4.0)


def test_safety_round_trip_and_unknown_key():
    safety = Safety(spike_factor=math.inf, spike_ema=0.5, cooldown=1, hysteresis=3, patience=2,
                    mode="max", min_delta=0.01)  # fmt: skip
    assert Safety.from_dict(safety.to_dict()) == safety
    assert Safety.from_dict({"cooldown": 0}) == Safety(cooldown=0)
    with pytest.raises(ValueError, match=r"safety: unknown key\(s\) \['cooldwn'\]"):
        Safety.from_dict({"cooldwn": 0})


def test_settings_objects_drive_the_state_machines_and_state_round_trips():
    ctrl = SensitivityController(safety=Safety(spike_factor=2.0, cooldown=0, hysteresis=1))
    ctrl.update(
        SensitivityReport([GroupEstimate("a", 10, grad_norm=1.0, hessian_trace=1.0)]), step=1
    )
    spike = SensitivityReport([GroupEstimate("a", 10, grad_norm=3.0, hessian_trace=1.0)])
    decision = ctrl.update(spike, step=2)
    assert decision.fallback and "gradient-norm spike in group a" in decision.event
    twin = SensitivityController.from_dict(ctrl.to_dict())
    twin.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert twin.state_dict() == ctrl.state_dict()
    other = SensitivityController(safety=Safety(spike_factor=3.0, cooldown=0, hysteresis=1))
    with pytest.raises(ValueError, match=r"spike_factor: saved 2\.0, here 3\.0"):
        other.load_state_dict(ctrl.state_dict())


def test_repr_shows_the_settings_objects():
    text = repr(SensitivityController("noise", bounds=Bounds(max_spread=2.0)))
    assert text.startswith("SensitivityController('noise', alpha=0.5")
    assert "bounds=Bounds(min_multiplier=0.1, max_multiplier=10.0, max_spread=2.0" in text
    assert "safety=Safety(spike_factor=10.0" in text
