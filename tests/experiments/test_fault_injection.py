"""The attacks on an ablation's results folder, run as tests: kill -9 mid-run then resume
gives the files of an uninterrupted run; every damaged or missing file gets an error from
`layerwise report` that names it (or, with --allow-incomplete, a line in the report); a
second `ablate` on a folder in use is refused."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from layerwise.experiments.cli import main
from layerwise.experiments.config import load_config
from layerwise.experiments.errors import UsageError
from layerwise.experiments.rundirs import lock
from layerwise.experiments.runner import ablate

from .ablations import TINY, TINY_RUNS, result_files, start_ablation, wait_for

RUN = "final__digits_mlp__curvature__default__s1"
TUNE = "tune__digits_mlp__uniform__default__lr0.003__s100"


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_ablation(tiny_ablation, tmp_path):
    out = tmp_path / "out"
    proc = start_ablation(out)

    def mid_final_run() -> bool:  # a final run in progress, its first metrics written
        return any(out.glob("runs/.tmp-final__*/metrics.csv"))

    wait_for(proc, mid_final_run, "a final run in progress")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(list(out.glob("runs/*/done.json"))) < TINY_RUNS, "killed midway"
    result = ablate(load_config(TINY), out, progress=False, report=False)
    assert not result.failed and result.ran + result.skipped == TINY_RUNS and result.ran >= 1
    assert not [p.name for p in (out / "runs").iterdir() if p.name.startswith(".")]
    resumed, reference = result_files(out), result_files(tiny_ablation)
    assert sorted(resumed) == sorted(reference), "the same files"
    for name, content in reference.items():
        assert resumed[name] == content, f"{name} differs from the uninterrupted run's"


# -- damaged results: `layerwise report` names every bad file -----------------------------


def _truncate(path: Path, keep: Callable[[str], str]) -> None:
    path.write_text(keep(path.read_text()))


def _header_only(text: str) -> str:
    return text.splitlines(keepends=True)[0]


def _mid_row(text: str) -> str:
    """Cut the last row just after the minus sign of a negative number, so that the row's
    last field is "-" (before the fix: a crash in the figures naming no file). The row is
    cut after its second field and the sign written there, so the damage does not depend
    on the estimates' signs (random probes) happening to put a minus in the last row."""
    start = text.rindex("\n", 0, len(text) - 1) + 1
    cut = text.index(",", text.index(",", start) + 1) + 1
    assert start < cut < len(text) - 1, "inside the last row"
    return text[:cut] + "-"


def _last_row_lost(text: str) -> str:  # cut at a line end: every row whole, one missing
    return "".join(text.splitlines(keepends=True)[:-1])


# (what is done to the folder, the problem line `layerwise report` must print)
DAMAGE = {
    "done.json deleted": (
        lambda out: (out / "runs" / RUN / "done.json").unlink(),
        f"runs/{RUN}/done.json: missing (the run did not finish)",
    ),
    "manifest.json garbage": (
        lambda out: (out / "runs" / RUN / "manifest.json").write_text("garbage"),
        f"runs/{RUN}/manifest.json: not valid JSON (Expecting value: line 1 column 1 (char 0))",
    ),
    "metrics.csv truncated to its header": (
        lambda out: _truncate(out / "runs" / RUN / "metrics.csv", _header_only),
        f"runs/{RUN}/metrics.csv: no rows under the header (truncated?)",
    ),
    "metrics.csv truncated mid-row": (
        lambda out: _truncate(out / "runs" / RUN / "metrics.csv", _mid_row),
        f"runs/{RUN}/metrics.csv: the last row has no line end (truncated?)",
    ),
    "metrics.csv lost its last row": (
        lambda out: _truncate(out / "runs" / RUN / "metrics.csv", _last_row_lost),
        f"runs/{RUN}/metrics.csv: ends at step 20, but done.json records the run's last "
        "step as 30 (rows lost?)",
    ),
    "events.csv garbage": (
        lambda out: (out / "runs" / RUN / "events.csv").write_text("garbage\n"),
        f"runs/{RUN}/events.csv: missing column(s) ['step', 'event', 'fallback', 'skipped']",
    ),
    "tuning.json garbage": (
        lambda out: (out / "tuning.json").write_text("garbage"),
        "tuning.json: not valid JSON (Expecting value: line 1 column 1 (char 0))",
    ),
    "final run folder deleted": (
        lambda out: shutil.rmtree(out / "runs" / RUN),
        f"runs/{RUN}: missing (not run yet, or interrupted)",
    ),
    "tuning run failed": (
        lambda out: (
            shutil.rmtree(out / "runs" / TUNE),
            (out / "errors").mkdir(),
            (out / "errors" / f"{TUNE}.txt").write_text("Traceback ..."),
        ),
        f"runs/{TUNE}: missing; the run failed (see errors/{TUNE}.txt)",
    ),
    "a run the config does not plan": (
        lambda out: shutil.copytree(
            out / "runs" / RUN, out / "runs" / "final__digits_mlp__curvature__default__s9"
        ),
        "runs/final__digits_mlp__curvature__default__s9: not a run of the config in ablation.json",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_report_names_each_bad_file_and_exits_non_zero(tiny_copy, damage, capsys):
    harm, problem = DAMAGE[damage]
    harm(tiny_copy)
    assert main(["report", str(tiny_copy), "--no-figures"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"layerwise report: error: {tiny_copy}: 1 run(s) or file(s) missing or unreadable "
        "(listed below); run the same `layerwise ablate` again to finish missing runs (remove "
        "a damaged run's folder to have it redone), or report the rest with --allow-incomplete"
    )
    assert err[1:] == [f"  {problem}"]
    assert not (tiny_copy / "report.md").exists(), "nothing written"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_allow_incomplete_reports_the_rest_and_lists_the_problem(tiny_copy, damage, capsys):
    harm, problem = DAMAGE[damage]
    harm(tiny_copy)
    assert main(["report", str(tiny_copy), "--no-figures", "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "incomplete: 1 missing or unreadable run(s) or file(s) left out" in out
    report = (tiny_copy / "report.md").read_text()
    assert "**Incomplete:** 1 missing or unreadable run(s) or file(s)" in report
    assert report.rstrip().endswith(f"## Missing or unreadable runs\n\n- {problem}")
    # the damaged final run is left out of the comparison, not counted
    n_curvature = "1" if RUN in problem else "2"
    assert f"| curvature | 0.01 | {n_curvature} |" in report


def test_a_run_cut_mid_row_is_left_out_of_the_figures_instead_of_crashing(tiny_copy):
    _truncate(tiny_copy / "runs" / RUN / "metrics.csv", _mid_row)
    assert main(["report", str(tiny_copy), "--allow-incomplete"]) == 0
    assert (tiny_copy / "figures" / "digits_mlp__default__curvature.png").is_file()


def test_every_bad_file_is_listed_not_only_the_first(tiny_copy, capsys):
    for damage in ("done.json deleted", "tuning.json garbage", "tuning run failed"):
        DAMAGE[damage][0](tiny_copy)
    assert main(["report", str(tiny_copy), "--no-figures"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"{tiny_copy}: 3 run(s) or file(s) missing or unreadable" in err[0]
    assert sorted(err[1:]) == sorted(
        f"  {DAMAGE[d][1]}"
        for d in ("done.json deleted", "tuning.json garbage", "tuning run failed")
    )


def test_an_intact_folder_reports_cleanly(tiny_copy, capsys):
    assert main(["report", str(tiny_copy), "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "incomplete" not in captured.out
    report = (tiny_copy / "report.md").read_text()
    assert "4 tuning runs finished of 8 planned" in report
    assert "Incomplete" not in report and "## Missing" not in report


# -- a second writer -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_concurrent_ablate_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    first = start_ablation(out)
    try:
        wait_for(first, lambda: (out / ".lock").is_file(), "the first ablation took the lock")
        code = main(["ablate", str(TINY), "--out", str(out), "--no-report", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"is in use by another layerwise process (pid {first.pid})" in err
        assert first.poll() is None, "the first ablation goes on"
    finally:
        first.kill()
        first.wait()


def test_a_lock_just_created_and_not_yet_written_is_not_taken_over(tmp_path):
    """Two ablations started at once: the second must not mistake the first's lock, created
    but not yet holding its pid, for an abandoned one."""
    path = tmp_path / ".lock"
    path.touch()  # the first process has created the file ...
    holder = f"{socket.gethostname()} {os.getpid()}"
    writer = threading.Timer(0.2, lambda: path.write_text(holder))  # ... and writes it soon
    writer.start()
    try:
        with (
            pytest.raises(
                UsageError, match=f"in use by another layerwise process \\(pid {os.getpid()}\\)"
            ),
            lock(tmp_path),
        ):
            pass
    finally:
        writer.join()
    assert path.read_text() == holder, "the first process's lock is left alone"


def test_an_empty_lock_left_by_a_crash_is_taken_over(tmp_path):
    (tmp_path / ".lock").touch()  # created, then killed before writing its pid
    with lock(tmp_path):
        assert (tmp_path / ".lock").read_text().split()[1] == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
