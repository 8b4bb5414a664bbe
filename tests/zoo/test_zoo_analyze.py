"""``layerwise analyze`` on Hugging Face models given by factories, as a user runs it:
``--model``/``--data``/``--loss`` import paths, ``--head`` naming a tied head by its alias,
``--quantities``, and the model's own ``.loss`` as the default loss of dict batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerwise.sensitivity import SensitivityReport
from tests.experiments.test_analyze_end_to_end import run_cli

from . import cli
from .cases import missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing("transformers")), reason=str(missing("transformers"))),
]


def test_analyze_takes_gpt2_by_factory_with_its_tied_head_named_by_alias():
    run = run_cli(
        "analyze", "--model", "tests.zoo.cli:gpt2", "--data", "tests.zoo.cli:token_batches",
        "--loss", "tests.zoo.cli:causal_lm_loss", "--strategy", "depth", "--head", "lm_head",
        "--quantities", "grad_norm", "hessian_trace", "--probes", "4", "--batches", "2",
        "--format", "json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    report = SensitivityReport.from_dict(doc)
    assert report.names == ["stem", "layer.0", "layer.1", "transformer.ln_f", "head"]
    assert all(g.is_finite() and g.hessian_probes == 8 for g in report)
    groups = doc["manifest"]["groups"]
    assert groups["head"] == ["lm_head"] and groups["tied"] == {
        "lm_head.weight": "transformer.wte.weight"
    }
    head = next(g for g in groups["groups"] if g["name"] == "head")
    assert head["parameters"] == ["transformer.wte.weight"] and head["role"] == "head"


def test_analyze_defaults_to_the_models_own_loss_for_dict_batches():
    run = run_cli(
        "analyze", "--model", "tests.zoo.cli:llama", "--data",
        "tests.zoo.cli:labelled_token_batches", "--strategy", "depth", "--batches", "2",
        "--policy", "noise", "--quantities", "grad_norm", "grad_variance", "--format", "json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    manifest = doc["manifest"]
    assert manifest["loss"].startswith("model(**batch).loss")
    batch = dict(cli.labelled_token_batches()[0])
    with torch.no_grad():
        expected = float(cli.llama()(**batch).loss)
    assert math.isclose(manifest["first_batch_loss"], expected, rel_tol=1e-5)
    report = SensitivityReport.from_dict(doc)
    assert report.names == ["stem", "layer.0", "layer.1", "model.norm", "head"]
    assert all(g.grad_norm > 0 and g.grad_variance > 0 for g in report)


def test_analyze_names_the_missing_loss_of_dict_batches_without_labels():
    run = run_cli(
        "analyze", "--model", "tests.zoo.cli:llama", "--data", "tests.zoo.cli:token_batches",
        "--quantities", "grad_norm", "--policy", "trust_ratio",
    )  # fmt: skip
    assert run.returncode == 2
    assert "the default loss for dict batches: " in run.stderr
    assert "the model returned no loss" in run.stderr
    assert run.stderr.count("\n") == 1 and "give --loss" in run.stderr
