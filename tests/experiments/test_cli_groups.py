"""``layerwise groups`` prints the group table of a bundled or user model in table, CSV or
JSON form; bad input is one line on stderr and exit code 2 (1 when the user's factory fails),
never a traceback; a real subprocess shows the same."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from torch import nn

from layerwise.experiments.cli import main
from layerwise.experiments.models import MODELS, resolve_model

ROOT = Path(__file__).resolve().parents[2]

#: module-level objects the tests name by import path
INSTANCE = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def needs_arguments(width):
    return nn.Linear(width, width)


def not_a_model():
    return "a string"


def broken():
    raise RuntimeError("the factory broke\nsecond line")


def run(capsys, *argv):
    code = main(["groups", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_is_a_table_of_the_bundled_cnn(capsys):
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "model cnn (SmallResNet), strategy depth"
    assert lines[1].split() == ["group", "params", "size", "depth", "role", "decay"]
    assert [line.split()[0] for line in lines[2:8]] == [
        "stem", "layer.0", "layer.1", "layer.2", "layer.3", "head",
    ]  # fmt: skip
    assert lines[-1] == "frozen (left out): none"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_bundled_model_groups_with_depth_and_norm(capsys, name):
    code, out, _ = run(capsys, "--model", name, "--strategy", "depth+norm")
    assert code == 0
    assert "head.no_decay" in out and "strategy depth+norm" in out
    model = resolve_model(name)
    assert f"{sum(p.numel() for p in model.parameters()):,} trainable scalars" in out


def test_options_reach_the_grouping(capsys):
    code, out, _ = run(capsys, "--num-groups", "2")
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["stem-layer.1", "layer.2-head"]
    code, out, _ = run(
        capsys, "--model", "transformer", "--strategy", "role", "--head", "norm", "head"
    )
    assert code == 0 and "backbone" in out
    code, out, _ = run(
        capsys, "--strategy", "patterns", "--pattern", "stem=stem", "--pattern", "top=fc",
        "--pattern", "top=blocks.3", "--catch-all", "body", "--glob", "--format", "json",
    )  # fmt: skip
    record = json.loads(out)
    assert [g["name"] for g in record["groups"]] == ["stem", "top", "body"]
    assert record["options"]["patterns"] == {"stem": ["stem"], "top": ["fc", "blocks.3"]}
    assert record["options"]["syntax"] == "glob"


def test_shared_grouping_flags(capsys, tmp_path, monkeypatch):
    """The flags `layerwise analyze` shares: --pattern alone means the patterns strategy,
    --groups spells --strategy, and --groups-file reads the patterns (and their syntax and
    catch-all) from TOML."""
    code, out, _ = run(capsys, "--pattern", "stem=stem", "--catch-all", "rest", "--format", "json")
    assert code == 0 and json.loads(out)["strategy"] == "patterns"
    code, out, _ = run(capsys, "--groups", "module", "--model", "mlp", "--format", "json")
    assert code == 0 and json.loads(out)["strategy"] == "module"
    monkeypatch.chdir(tmp_path)
    Path("top.toml").write_text('stem = "stem"\nrest = ".*"\n')
    Path("nested.toml").write_text('syntax = "glob"\ncatch_all = "body"\n[groups]\nhead = "fc"\n')
    code, out, _ = run(capsys, "--groups-file", "top.toml", "--format", "json")
    assert code == 0 and [g["name"] for g in json.loads(out)["groups"]] == ["stem", "rest"]
    code, out, _ = run(capsys, "--groups-file", "nested.toml", "--format", "json")
    record = json.loads(out)
    assert [g["name"] for g in record["groups"]] == ["head", "body"]
    assert (record["options"]["syntax"], record["options"]["catch_all"]) == ("glob", "body")


def test_csv_and_json_formats(capsys):
    code, out, _ = run(capsys, "--model", "mlp", "--format", "csv")
    frame = pd.read_csv(io.StringIO(out))
    assert code == 0 and list(frame.columns)[:3] == ["name", "parameters", "size"]
    assert frame["name"].tolist() == ["layer.0", "layer.1", "head"]
    code, out, _ = run(capsys, "--model", "mlp", "--format", "json", "--strategy", "module")
    record = json.loads(out)
    assert record["model"] == "mlp" and record["model_class"] == "Sequential"
    assert record["strategy"] == "module" and record["groups"][0]["parameters"] == [
        "0.weight",
        "0.bias",
    ]


def test_user_models_by_import_path(capsys):
    code, out, _ = run(capsys, "--model", "tests.policies.models:SmallCNN")
    assert code == 0 and out.startswith("model tests.policies.models:SmallCNN (SmallCNN)")
    code, out, _ = run(capsys, "--model", f"{__name__}:INSTANCE", "--format", "csv")
    assert code == 0 and pd.read_csv(io.StringIO(out))["name"].tolist() == ["layer.0", "head"]
    code, out, _ = run(capsys, "--model", "tests.policies.models:FrozenBackbone")
    assert "frozen (left out): 6 parameters" in out


def test_rich_table_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run(capsys, "--model", "mlp", "--strategy", "role")
    assert code == 0
    assert "backbone" in out and "head" in out and "frozen (left out): none" in out
    assert "─" in out or "━" in out  # a drawn table, not the plain one


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--strategy", "deep"], 2, "strategy must be one of"),
        (["--num-groups", "x"], 2, "--num-groups must be a positive integer, got 'x'"),
        (["--num-groups", "0"], 2, "--num-groups must be a positive integer, got '0'"),
        (["--num-groups", "99"], 2, "num_groups=99 exceeds the 6 trainable layer(s)"),
        (["--format", "xml"], 2, "--format must be one of table, csv, json, got 'xml'"),
        (["--model", "resnet9000"], 2, "unknown model 'resnet9000': bundled models are mlp"),
        (
            ["--model", "layerwise.experiments.models:nope"],
            2,
            "module 'layerwise.experiments.models' has no 'nope'",
        ),
        (["--model", "no_such_pkg.mod:f"], 2, "cannot import module 'no_such_pkg.mod'"),
        (["--model", f"{__name__}:needs_arguments"], 2, "cannot be called without arguments"),
        (["--model", f"{__name__}:not_a_model"], 2, "returned a str, not a torch.nn.Module"),
        (["--model", f"{__name__}:ROOT"], 2, "is a PosixPath, not a factory or a Module"),
        (["--model", f"{__name__}:broken"], 1, "raised RuntimeError: the factory broke"),
        (
            ["--strategy", "patterns", "--pattern", "stem"],
            2,
            "--pattern must look like GROUP=PATTERN",
        ),
        (["--strategy", "patterns", "--pattern", "s=stem"], 2, "no pattern matches 29 trainable"),
        (["--model", "tests.policies.models:TiedLM", "--strategy", "role"], 2, "is tied to"),
        (["--head", "("], 2, "head: invalid regular expression '('"),
        (["--groups-file", "none.toml"], 2, "--groups-file 'none.toml': no such file"),
        (["--groups-file", "bad.toml"], 2, "--groups-file 'bad.toml' is not valid TOML"),
        (["--groups-file", "extra.toml"], 2, "unknown top-level keys ['other']"),
        (["--groups-file", "number.toml"], 2, "number.toml': patterns['stem'] must be a pattern"),
        (["--groups-file", "number.toml", "--pattern", "a=b"], 2, "--pattern or --groups-file"),
        (["--strategy", "depth", "--pattern", "a=stem"], 2, "patterns applies only to"),
    ],
)
def test_bad_input_is_one_line_on_stderr(capsys, tmp_path, monkeypatch, argv, code, message):
    monkeypatch.chdir(tmp_path)
    Path("bad.toml").write_text("stem = [1, 2\n")
    Path("extra.toml").write_text('other = 1\n[groups]\nstem = "stem"\n')
    Path("number.toml").write_text("stem = 3\n")
    got, out, err = run(capsys, *argv)
    assert got == code and out == ""
    assert err.count("\n") == 1 and err.startswith("layerwise groups: error: ")
    assert message in err


def test_subprocess_exit_code_and_one_line_error():
    bad = subprocess.run(
        [sys.executable, "-m", "layerwise.experiments.cli", "groups", "--strategy", "role",
         "--head", "zzz"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "layerwise groups: error: head: no parameter matches ['zzz']\n"
