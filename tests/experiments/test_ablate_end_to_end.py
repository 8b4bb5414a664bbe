"""`layerwise ablate` on the tiny config, end to end: tuning, final runs, files, report;
and bad input refused with one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from layerwise.experiments.cli import main

TINY = Path(__file__).parents[2] / "experiments" / "configs" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "out"
    code = main(["ablate", str(TINY), "--out", str(out), "--no-progress"])
    return code, out


def test_exit_code_and_layout(tiny_run):
    code, out = tiny_run
    assert code == 0
    for name in ("ablation.json", "config.toml", "tuning.json", "report.md"):
        assert (out / name).is_file(), name
    runs = sorted(p.name for p in (out / "runs").iterdir())
    # 2 policies x 2 rates x 1 tuning seed + 2 policies x 2 seeds
    assert len([r for r in runs if r.startswith("tune__")]) == 4
    assert len([r for r in runs if r.startswith("final__")]) == 4
    assert not [r for r in runs if r.startswith(".")], "no temporary folder is left behind"
    for run in (out / "runs").iterdir():
        assert {"manifest.json", "metrics.csv", "metrics.jsonl", "events.csv", "done.json"} <= {
            p.name for p in run.iterdir()
        }


def test_tuning_is_fair_and_recorded(tiny_run):
    _, out = tiny_run
    tuning = json.loads((out / "tuning.json").read_text())
    assert set(tuning["chosen"]) == {"digits_mlp/default/uniform", "digits_mlp/default/curvature"}
    for key, entry in tuning["chosen"].items():
        assert set(entry["scores"]) == {"0.003", "0.01"}, "every policy searched the same grid"
        best = max(entry["scores"].items(), key=lambda kv: kv[1]["val_metric"])
        assert entry["lr"] == float(best[0])
        policy = key.split("/")[-1]
        for seed in (0, 1):
            done = json.loads(
                (
                    out / "runs" / f"final__digits_mlp__{policy}__default__s{seed}" / "done.json"
                ).read_text()
            )
            assert done["lr"] == entry["lr"], "final runs use the tuned rate"


def test_test_split_only_in_final_runs(tiny_run):
    _, out = tiny_run
    for run in (out / "runs").iterdir():
        done = json.loads((run / "done.json").read_text())
        assert ("test_metric" in done) == run.name.startswith("final__")
        assert done["status"] == "ok"


def test_metrics_rows_at_every_evaluation(tiny_run):
    _, out = tiny_run
    frame = pd.read_csv(out / "runs" / "final__digits_mlp__curvature__default__s0" / "metrics.csv")
    assert frame["step"].tolist() == [0, 10, 20, 30]
    groups = ["layer.0", "layer.1", "head"]
    for quantity in ("lr", "multiplier", "grad_norm", "curvature", "noise"):
        assert all(f"{quantity}/{g}" in frame for g in groups)
    assert frame["wall_time"].is_monotonic_increasing
    assert frame["curvature/head"].iloc[1:].notna().all(), "the monitor measured every group"
    lines = (
        (out / "runs" / "final__digits_mlp__curvature__default__s0" / "metrics.jsonl")
        .read_text()
        .splitlines()
    )
    assert len(lines) == 4 and json.loads(lines[-1])["step"] == 30
    rec = pd.read_csv(
        out / "runs" / "final__digits_mlp__curvature__default__s0" / "recalibrations.csv"
    )
    assert sorted(rec["step"].unique()) == [10, 20, 30], "recalibrate_every=10 after warmup 10"


def test_a_rerun_skips_everything(tiny_run, capsys):
    _, out = tiny_run
    capsys.readouterr()
    assert main(["ablate", str(TINY), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert "0 ran, 8 already done" in capsys.readouterr().out


def test_a_user_task_by_import_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_tasks_e2e.py").write_text(
        "from layerwise.experiments.tasks import get_task\n"
        "def small():\n"
        "    return get_task('digits_mlp').with_overrides(steps=4, eval_every=2, batch_size=16,"
        " lr_grid=(0.01,))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "user.toml"
    config.write_text(
        'seeds = [0]\npolicies = ["uniform"]\n[monitor]\nprobes = 0\n'
        '[[tasks]]\nname = "user_tasks_e2e:small"\nlabel = "mine"\n'
    )
    out = tmp_path / "out"
    assert main(["ablate", str(config), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert (out / "runs" / "final__mine__uniform__default__s0" / "done.json").is_file()


BAD = {
    "missing seeds": ('tasks = ["digits_mlp"]\npolicies = ["uniform"]\n', "missing key 'seeds'"),
    "unknown task": ('seeds = [0]\ntasks = ["nope"]\npolicies = ["uniform"]\n', "unknown task"),
    "unknown policy": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform", "magic"]\n',
        "policy 'magic'",
    ),
    "no baseline": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["curvature"]\n',
        "must include 'uniform'",
    ),
    "bad toml": ("seeds = [0\n", "not valid TOML"),
    "unknown key": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\nseed = 1\n',
        "unknown key",
    ),
    "bad controller option": (
        'seeds = [0]\ntasks = ["digits_mlp"]\n[policies.uniform]\n'
        "[policies.curvature]\ncontroller = { alpha = -1 }\n",
        "alpha",
    ),
    "bad override": (
        'seeds = [0]\npolicies = ["uniform"]\n[[tasks]]\nname = "digits_mlp"\nsteps = 0\n',
        "steps must be a positive integer",
    ),
    "bad schedule": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\n'
        '[schedule]\nname = "zigzag"\n',
        "schedule",
    ),
    "overlapping seeds": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\n[tuning]\nseeds = [0]\n',
        "overlap",
    ),
    # Checked before the folder is claimed: a bad value here used to surface only when the
    # runs were planned or executed, after ablation.json had tied --out to the bad config.
    "bad setting override": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\n[settings.short]\n'
        "steps = -5\n",
        "settings.short",
    ),
    "bad setting grid": (
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\n[settings.g]\n'
        'lr_grid = "x"\n',
        "settings.g",
    ),
    "bad estimator option": (
        'seeds = [0]\ntasks = ["digits_mlp"]\n[policies.uniform]\n'
        "[policies.curvature]\nestimator = { probes = -1 }\n",
        "probes",
    ),
    "unknown estimator option": (
        'seeds = [0]\ntasks = ["digits_mlp"]\n[policies.uniform]\n'
        "[policies.curvature]\nestimator = { probez = 2 }\n",
        "probez",
    ),
    "seed beyond 64 bits": (
        'seeds = [99999999999999999999]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\n',
        "seeds",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_and_exit_2(case, tmp_path, capsys):
    text, message = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code = main(["ablate", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written for a bad config"


def test_missing_config_and_report_of_nothing(tmp_path, capsys):
    assert main(["ablate", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a file nor a bundled config" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no runs/ folder" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused_before_any_run(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "cuda.toml"
    path.write_text(
        'seeds = [0]\ntasks = ["digits_mlp"]\npolicies = ["uniform"]\ndevice = "cuda"\n'
    )
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "device 'cuda'" in err
    assert not (tmp_path / "out").exists(), "nothing is written for an absent device"


def test_a_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00seeds")
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config binary.toml" in err and "UTF-8" in err
    assert not (tmp_path / "out").exists()


def test_bundled_configs_parse():
    from layerwise.experiments.commands.ablate import resolve_config_path
    from layerwise.experiments.config import load_config
    from layerwise.experiments.plan import final_specs, lr_grid, tuning_specs

    for name in ("quickstart", "full", "tiny", "control", "regimes"):
        config = load_config(resolve_config_path(name))
        assert "uniform" in config.policies and tuning_specs(config)
    full = load_config(resolve_config_path("full"))
    assert len(full.tasks) == 10 and len(full.policies) == 9 and len(full.seeds) == 5
    assert len(final_specs(full, dict.fromkeys(lr_grid(full), 1e-3))) == 10 * 9 * 5


@pytest.mark.slow
def test_two_workers_give_the_same_numbers_as_one(tmp_path):
    """Spawned workers (one torch thread each) reproduce the in-process run exactly."""
    config = tmp_path / "one.toml"
    config.write_text(
        'seeds = [0]\npolicies = ["uniform"]\n[monitor]\nprobes = 0\n'
        '[[tasks]]\nname = "digits_mlp"\nsteps = 6\neval_every = 3\n'
        "batch_size = 16\nlr_grid = [0.01]\n"
    )
    for workers in (1, 2):
        args = [
            "ablate",
            str(config),
            "--out",
            str(tmp_path / f"w{workers}"),
            "--no-progress",
            "--no-report",
            "--workers",
            str(workers),
        ]
        assert main(args) == 0
    run = "runs/final__digits_mlp__uniform__default__s0/metrics.csv"
    a, b = (pd.read_csv(tmp_path / f"w{w}" / run) for w in (1, 2))
    columns = [c for c in a.columns if not c.endswith("_time")]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    shutil.rmtree(tmp_path / "w2")
