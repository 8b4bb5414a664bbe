"""Interrupted ablations resume: finished runs are skipped and kept byte for byte,
half-written ones are redone, a different config is refused (or moved aside, never lost)."""

from __future__ import annotations

import os
import signal

import pytest

from layerwise.experiments.cli import main
from layerwise.experiments.config import load_config
from layerwise.experiments.errors import UsageError
from layerwise.experiments.runner import ablate

from .ablations import TINY, TINY_RUNS, start_ablation, wait_for
from .ablations import finished_runs as _finished
from .ablations import without_timings as _results


@pytest.fixture
def copy(tiny_copy):
    return tiny_copy


@pytest.mark.slow
def test_killed_midway_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "out"
    proc = start_ablation(out)
    wait_for(proc, lambda: bool(list(out.glob("runs/*/done.json"))), "a run finished")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished(out)
    assert 1 <= len(before) < TINY_RUNS, "killed midway"
    result = ablate(load_config(TINY), out, progress=False, report=False)
    assert not result.failed and result.skipped >= len(before)
    assert result.ran + result.skipped == TINY_RUNS
    after = _finished(out)
    assert len(after) == TINY_RUNS
    for run_id, (content, mtime) in before.items():
        assert after[run_id] == (content, mtime), f"{run_id} was redone or changed"
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]


def test_half_written_run_is_redone_and_finished_temp_is_promoted(copy):
    runs = copy / "runs"
    before = _finished(copy)
    half = "final__digits_mlp__uniform__default__s1"
    (runs / half / "done.json").unlink()  # a run folder without its done marker
    (runs / half / "metrics.csv").write_text("step\n0\n")
    pending = "final__digits_mlp__curvature__default__s0"  # killed between marker and rename
    os.replace(runs / pending, runs / f".tmp-{pending}-0000abcd")
    broken = runs / ".tmp-final__digits_mlp__curvature__default__s1-0000beef"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")  # an interrupted run in progress
    result = ablate(load_config(TINY), copy, progress=False, report=False)
    assert result.ran == 1 and result.skipped == 7 and not result.failed
    after = _finished(copy)
    assert set(after) == set(before)
    assert after[pending][0] == before[pending][0], "the finished temp folder was promoted"
    assert after[half][1] != before[half][1], "the half-written run was redone"
    assert _results(after[half][0]) == _results(before[half][0]), "deterministic: same numbers"
    for run_id in set(before) - {half, pending}:
        assert after[run_id] == before[run_id]
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]


def test_another_config_is_refused_then_moved_aside_with_force(copy, tmp_path, capsys):
    changed = tmp_path / "changed.toml"
    changed.write_text(TINY.read_text().replace("seeds = [0, 1]", "seeds = [0, 2]"))
    before = _finished(copy)
    code = main(["ablate", str(changed), "--out", str(copy), "--no-report", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "holds results of another config" in err
    assert len(err.strip().splitlines()) == 1
    assert _finished(copy) == before, "nothing touched"
    code = main(
        ["ablate", str(changed), "--out", str(copy), "--no-report", "--no-progress", "--force"]
    )
    assert code == 0
    (aside,) = (copy / "superseded").iterdir()
    kept = {
        p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in (aside / "runs").glob("*/done.json")
    }
    assert kept == before, "the old results are kept aside, intact"
    assert "final__digits_mlp__uniform__default__s2" in _finished(copy)


def test_a_live_lock_refuses_a_second_writer(copy):
    import socket

    (copy / ".lock").write_text(f"{socket.gethostname()} {os.getppid()}")
    with pytest.raises(UsageError, match="in use by another layerwise process"):
        ablate(load_config(TINY), copy, progress=False, report=False)
    (copy / ".lock").write_text(f"{socket.gethostname()} 999999999")  # stale: taken over
    assert ablate(load_config(TINY), copy, progress=False, report=False).skipped == 8
    assert not (copy / ".lock").exists()


def test_force_moves_the_old_error_files_aside_too(tmp_path):
    """Failures of the superseded config must not be reported as failures of the new one."""
    from layerwise.experiments.rundirs import supersede

    out = tmp_path / "out"
    (out / "runs" / "final__a__uniform__default__s0").mkdir(parents=True)
    (out / "errors").mkdir()
    (out / "errors" / "final__a__uniform__default__s1.txt").write_text("Traceback ...")
    (out / "ablation.json").write_text("{}")
    aside = supersede(out, "0123456789abcdef")
    assert (aside / "errors" / "final__a__uniform__default__s1.txt").read_text() == "Traceback ..."
    assert not (out / "errors").exists() and not (out / "runs").exists()


def test_a_folder_holding_someone_elses_report_is_refused(tmp_path, capsys):
    """No ablation.json and no runs/, but a report.md the ablation would overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    code = main(["ablate", str(TINY), "--out", str(out), "--no-report", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "holds results of another config" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "report.md").read_text() == "my own notes"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"], "nothing written"
