"""EstimateOptions: every field's error names the field and the value; plain-data round
trips; replace validates again; estimate() takes options, shortcuts (which override) and
records what it used."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from layerwise.sensitivity import QUANTITIES, EstimateOptions, estimate

from .cases import cross_entropy, mlp

BAD = [
    ("quantities", ["grad_norm", "hessian"], ValueError, r"quantities has unknown names \['hess"),
    ("quantities", [], ValueError, r"quantities is empty \(got \[\]\)"),
    ("quantities", 3, TypeError, "quantities must be 'all' or an iterable of names, got 3"),
    ("probes", 0, ValueError, "probes must be >= 1, got 0"),
    ("probes", 2.5, TypeError, "probes must be an int, got 2.5"),
    ("seed", -1, ValueError, "seed must be >= 0, got -1"),
    ("seed", "0", TypeError, "seed must be an int, got '0'"),
    ("seed", 2**64, ValueError, r"seed must be an int in \[0, 2\*\*64\), got 18446744073709551616"),
    ("distribution", "normal", ValueError, r"distribution must be one of .* got 'normal'"),
    ("isolated", "yes", TypeError, "isolated must be a bool, got 'yes'"),
    ("chunk_size", 0, ValueError, "chunk_size must be >= 1, got 0"),
    ("chunk_size", True, TypeError, "chunk_size must be an int, got True"),
    ("hvp_mode", "fwd", ValueError, r"hvp_mode must be one of .* got 'fwd'"),
    ("variance", "loop", ValueError, r"variance must be one of .* got 'loop'"),
    ("micro_batches", 1, ValueError, "micro_batches must be >= 2, got 1"),
    ("dtype", torch.int64, TypeError, "dtype must be None or a floating torch.dtype, got torch.i"),
    ("dtype", "int64", TypeError, "dtype must be None or a floating torch.dtype, got torch.int64"),
    ("dtype", "float99", ValueError, "dtype must name a torch dtype such as 'float64', got 'flo"),
    ("dtype", 64, TypeError, "dtype must be None or a floating torch.dtype, got 64"),
    ("tolerance", 0.0, ValueError, "tolerance must be a finite number > 0, got 0.0"),
    ("tolerance", float("nan"), ValueError, "tolerance must be a finite number > 0, got nan"),
    ("tolerance", "0.1", TypeError, "tolerance must be a number or None, got '0.1'"),
    ("tolerance", True, TypeError, "tolerance must be a number or None, got True"),
    ("max_probes", 64, ValueError, "max_probes=64 is a budget for the stopping rule and needs"),
    ("example_chunk_size", 0, ValueError, "example_chunk_size must be >= 1, got 0"),
    ("ggn", "dense", ValueError, r"ggn must be one of \('mc', 'exact'\), got 'dense'"),
    ("ggn_samples", 0, ValueError, "ggn_samples must be >= 1, got 0"),
    ("ggn_samples", 1.5, TypeError, "ggn_samples must be an int, got 1.5"),
    ("ggn_sampler", "fisher", ValueError, r"ggn_sampler must be one of .* got 'fisher'"),
]  # fmt: skip


def test_every_field_has_an_error_case():
    assert {field for field, *_ in BAD} == set(EstimateOptions.names())


@pytest.mark.parametrize(
    ("field", "value", "error", "match"), BAD, ids=[f"{f}={v!r}" for f, v, *_ in BAD]
)
def test_bad_field_names_field_and_value(field, value, error, match):
    with pytest.raises(error, match=match):
        EstimateOptions(**{field: value})
    with pytest.raises(error, match=match):
        EstimateOptions().replace(**{field: value})  # replace validates again
    with pytest.raises(error, match=match):
        EstimateOptions.from_dict({field: value})


def test_max_probes_below_two_with_a_tolerance():
    with pytest.raises(ValueError, match="max_probes must be >= 2, got 1"):
        EstimateOptions(tolerance=0.1, max_probes=1)


def test_values_are_normalised():
    opts = EstimateOptions(quantities="all", dtype="float64", tolerance=1)
    assert opts.quantities == QUANTITIES and opts.dtype is torch.float64
    assert isinstance(opts.tolerance, float)
    assert EstimateOptions(quantities=["hessian_trace", "grad_norm"]).quantities == (
        "grad_norm", "hessian_trace",
    )  # fmt: skip
    assert EstimateOptions(dtype="torch.float32").dtype is torch.float32
    assert EstimateOptions(tolerance=0.1, max_probes=9).budget == 9
    assert EstimateOptions(probes=7).budget == 7


@pytest.mark.parametrize(
    "opts",
    [
        EstimateOptions(),
        EstimateOptions(
            quantities="hessian_trace",
            probes=3,
            seed=2**63,
            distribution="gaussian",
            isolated=True,
            chunk_size=1,
            hvp_mode="jvp",
            variance="two_batch",
            micro_batches=3,
            dtype=torch.float64,
            tolerance=0.05,
            max_probes=40,
            example_chunk_size=5,
        ),
    ],
)
def test_to_dict_is_plain_json_and_from_dict_inverts_it(opts):
    data = opts.to_dict()
    assert list(data) == list(EstimateOptions.names())
    text = json.dumps(data)
    assert EstimateOptions.from_dict(json.loads(text)) == opts
    assert data["dtype"] in (None, "torch.float64") and isinstance(data["quantities"], list)


def test_from_dict_and_replace_name_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown estimate option\(s\) \['probez'\]; known: "):
        EstimateOptions.from_dict({"probez": 3})
    with pytest.raises(TypeError, match=r"unknown estimate option\(s\) \['probez'\]; known: "):
        EstimateOptions().replace(probez=3)
    with pytest.raises(TypeError, match="estimate options must be a mapping, got 3"):
        EstimateOptions.from_dict(3)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EstimateOptions().probes = 3  # type: ignore[misc]


def _ce(model, batch):
    return cross_entropy(model(batch[0]), batch[1])


def test_options_object_equals_the_same_shortcuts_and_shortcuts_override_it():
    case = mlp()
    opts = EstimateOptions(probes=3, seed=4, quantities=["grad_norm", "hessian_trace"])
    a = estimate(case.model, _ce, case.batch, options=opts)
    b = estimate(case.model, _ce, case.batch, probes=3, seed=4,
                 quantities=["grad_norm", "hessian_trace"])  # fmt: skip
    assert a.groups == b.groups
    c = estimate(case.model, _ce, case.batch, options=opts, probes=5)
    assert c.settings["probes"] == 5 and c.settings["seed"] == 4
    assert {g.hessian_probes for g in c} == {5}
    with pytest.raises(ValueError, match="probes must be >= 1, got 0"):
        estimate(case.model, _ce, case.batch, options=opts, probes=0)


def test_settings_record_the_options():
    case = mlp()
    opts = EstimateOptions(probes=2, quantities=["grad_norm", "grad_variance", "hessian_trace"],
                           hvp_mode="vjp", example_chunk_size=3)  # fmt: skip
    report = estimate(case.model, _ce, case.batch, options=opts)
    recorded = report.settings
    for key, value in opts.to_dict().items():
        if key not in ("hvp_mode", "variance"):
            assert recorded[key] == value, key
    assert recorded["hvp_mode_requested"] == "vjp" and recorded["hvp_mode"] == "vjp"
    assert recorded["variance_requested"] == "auto" and recorded["variance"] == "per_example"


def test_unknown_keyword_and_bad_options_type():
    case = mlp()
    with pytest.raises(TypeError, match=r"estimate\(\) got unknown keyword argument\(s\) "
                                        r"\['probez'\]; the settings are \["):  # fmt: skip
        estimate(case.model, _ce, case.batch, probez=3)
    with pytest.raises(TypeError, match=r"options must be an EstimateOptions or None, got \{"):
        estimate(case.model, _ce, case.batch, options={"probes": 3})


def test_validated_options_are_reused_but_a_bad_value_equal_to_a_good_one_still_raises():
    """estimate() keeps options it validated, per (options, settings) with each value's type
    in the key: ``chunk_size=True`` equals the ``1`` seen before yet is refused, and a list
    and a tuple of the same quantities give the same options object."""
    import importlib

    estimate_module = importlib.import_module("layerwise.sensitivity.estimate")

    case = mlp()
    estimate(case.model, _ce, case.batch, quantities=["grad_norm"], chunk_size=1)
    with pytest.raises(TypeError, match="chunk_size must be an int, got True"):
        estimate(case.model, _ce, case.batch, quantities=["grad_norm"], chunk_size=True)
    first = estimate_module._resolve_options(None, {"quantities": ["grad_norm"], "probes": 3})
    again = estimate_module._resolve_options(None, {"quantities": ["grad_norm"], "probes": 3})
    assert first is again and first == EstimateOptions(quantities=("grad_norm",), probes=3)
    unhashable = estimate_module._resolve_options(None, {"quantities": {"grad_norm"}})
    assert unhashable.quantities == ("grad_norm",)
