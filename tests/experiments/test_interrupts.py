"""SIGTERM and SIGINT stop `layerwise ablate` at any phase: it exits promptly with
128 + the signal number after one line, no process it started is left running, and the
same command resumes to the results of an uninterrupted ablation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from layerwise.experiments.config import load_config
from layerwise.experiments.runner import ablate
from layerwise.experiments.signals import (
    REPEAT_EVERY,
    Interrupted,
    acknowledge,
    acknowledging,
    deferred,
    stop_on_signals,
)

from .ablations import ROOT, TINY, TINY_RUNS, result_files, wait_for

MARKER = "LAYERWISE_INTERRUPT_TEST"


def _start(out: Path, marker: str, config: Path = TINY, workers: int = 2) -> subprocess.Popen:
    """`layerwise ablate <config> --out out --workers 2` in its own session, every process
    it starts carrying ``MARKER=marker`` in its environment."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "layerwise.experiments.cli", "ablate", str(config)),
            *("--out", str(out), "--workers", str(workers), "--no-report", "--no-progress"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), MARKER: marker},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C of the test run does not reach it
    )


def _marked(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds ``MARKER=marker`` (from /proc:
    they may have left the process group, and psutil may not be installed)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is dead, only not yet reaped by its parent
                    pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return pids


def _interrupt(proc: subprocess.Popen, signum: int, marker: str) -> str:
    """Send ``signum``; return stderr once the process exited and no marked process is
    left, checking the exit code and the one-line message."""
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{signal.Signals(signum).name} did not stop the ablation within 30 s")
    took = time.monotonic() - sent
    text = err.decode()
    assert proc.returncode == 128 + signum, text[-2000:]
    lines = text.strip().splitlines()
    assert lines and f"interrupted by {signal.Signals(signum).name}" in lines[-1], text[-2000:]
    assert len([line for line in lines if "Traceback" in line]) == 0, text[-2000:]
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _marked(marker), f"processes left running: {_marked(marker)}"
    assert took < 20, f"took {took:.1f} s to stop"
    return text


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_at_start_up_or_mid_run_stops_everything_and_resumes(
    signum, tiny_ablation, tmp_path
):
    out = tmp_path / "out"
    marker = uuid.uuid4().hex

    # start-up: the folder is claimed, the workers are being started and load their data
    proc = _start(out, marker)
    wait_for(proc, lambda: (out / "ablation.json").exists(), "the folder claimed")
    _interrupt(proc, signum, marker)
    assert len(list(out.glob("runs/*/done.json"))) < TINY_RUNS
    assert not (out / ".lock").exists(), "the lock is released"

    # mid-run: some runs finished, others in progress in the workers
    proc = _start(out, marker)
    wait_for(
        proc,
        lambda: any(out.glob("runs/*/done.json")) and any(out.glob("runs/.tmp-*/metrics.csv")),
        "a run finished and another in progress",
    )
    _interrupt(proc, signum, marker)
    assert len(list(out.glob("runs/*/done.json"))) < TINY_RUNS, "interrupted midway"

    result = ablate(load_config(TINY), out, progress=False, report=False)
    assert not result.failed and result.ran + result.skipped == TINY_RUNS
    assert not [p.name for p in (out / "runs").iterdir() if p.name.startswith(".")]
    resumed, reference = result_files(out), result_files(tiny_ablation)
    assert sorted(resumed) == sorted(reference)
    for name, content in reference.items():
        assert resumed[name] == content, f"{name} differs from the uninterrupted run's"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_data_generation_stops_at_once(signum, tmp_path):
    """MNIST-1D is generated when the first run starts (here in the main process, with
    ``--workers 1``): a signal then stops the command, and no data file is half-written."""
    config = tmp_path / "mnist1d.toml"
    config.write_text(TINY.read_text().replace('name = "digits_mlp"', 'name = "mnist1d_mlp"'))
    out, marker = tmp_path / "out", uuid.uuid4().hex
    proc = _start(out, marker, config, workers=1)
    wait_for(proc, lambda: any(out.glob(".cache/mnist1d-*.lock")), "the data being generated")
    assert not any(out.glob(".cache/mnist1d-*.npz")), "still generating"
    _interrupt(proc, signum, marker)
    assert not any(out.glob(".cache/.*.tmp")) and not any(out.glob("runs/*/done.json"))
    assert not (out / ".lock").exists(), "the lock is released"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_command_leaves_no_worker_running(tmp_path):
    out, marker = tmp_path / "out", uuid.uuid4().hex
    proc = _start(out, marker)
    wait_for(proc, lambda: any(out.glob("runs/.tmp-*/metrics.csv")), "a run in progress")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _marked(marker), "workers outlived the command"


def test_a_swallowed_interrupt_is_raised_again_until_acknowledged():
    """NumPy's C code can swallow the exception a signal handler raises: the signal is
    repeated until the stop is taken in hand; then signals are ignored, and on leaving the
    block the handlers are restored."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    raised = []
    with stop_on_signals():
        with stop_on_signals():  # nested: the outer block's handlers stay
            pass
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Interrupted:  # swallowed, as by NumPy
            raised.append(time.monotonic())
        with pytest.raises(Interrupted) as caught:
            time.sleep(5)  # the repeat comes within REPEAT_EVERY seconds
        raised.append(time.monotonic())
        assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
        assert isinstance(caught.value, KeyboardInterrupt)
        assert raised[1] - raised[0] < 4 * REPEAT_EVERY + 1
        acknowledge()
        os.kill(os.getpid(), signal.SIGINT)  # the clean-up is not cut short
        time.sleep(3 * REPEAT_EVERY)  # and nothing is repeated
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_inside_a_deferred_section_is_raised_at_its_end():
    with pytest.raises(Interrupted) as caught, stop_on_signals(), acknowledging(), deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        finished = True
    assert finished and caught.value.signum == signal.SIGINT
