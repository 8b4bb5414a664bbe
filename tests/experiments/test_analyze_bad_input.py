"""Every bad input of `layerwise analyze` gives one line on stderr, no traceback, and a non-zero
exit code (2 for usage errors); `--debug` shows the traceback; an --out folder holding earlier
results is refused without --force, and with --force nothing else in it is touched.

The failing runs are data: :data:`CASES` (the issue's list) run as real subprocesses, launched
concurrently once per module; :data:`IN_PROCESS` (more of the same) through the dispatcher."""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from layerwise.experiments.analysis import OUTPUT_FILES
from layerwise.experiments.cli import main

from .test_analyze_end_to_end import TORCH_JIT_WARNING, once, run_cli, user_workspace

MODEL = ("--model", "lw_user_models:make_model")
DATA = ("--data", "lw_user_models:batches")
SMALL = ("--probes", "2", "--batches", "1")


def _write_bad_files(root):
    (root / "corrupt.pt").write_bytes(b"this is not a torch checkpoint\x00\x01" * 8)
    state = torch.load(root / "checkpoint.pt", weights_only=True)["model"]
    mismatched = {k: v for k, v in state.items() if k != "3.bias"}
    mismatched["extra.weight"] = torch.zeros(2)
    torch.save(mismatched, root / "mismatched.pt")
    nan = dict(state)
    nan["0.weight"] = nan["0.weight"].clone()
    nan["0.weight"][0, 0] = math.nan
    torch.save(nan, root / "nan.pt")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, root / "no_state.pt")
    torch.save(torch.ones(3), root / "tensor.pt")
    torch.save(torch.nn.Linear(2, 2), root / "module.pt")  # a whole module, not a state dict
    shapes = dict(state)
    shapes["3.weight"] = torch.zeros(5, 16)
    torch.save(shapes, root / "shapes.pt")
    for name in ("earlier", "forced"):
        (root / name).mkdir()
        (root / name / "report.json").write_text('{"earlier": true}\n')
        (root / name / "notes.txt").write_text("my notes\n")
    (root / "bad.toml").write_text("stem = [1, 2\n")


#: The bad inputs of the issue, each run as a real subprocess:
#: (id, arguments after `analyze`, exit code, substrings the one stderr line must hold).
CASES = [
    ("missing-checkpoint", [*MODEL, *DATA, "--checkpoint", "nope.pt"], 2,
     ["--checkpoint 'nope.pt'", "no such file"]),
    ("corrupt-checkpoint", [*MODEL, *DATA, "--checkpoint", "corrupt.pt"], 2,
     ["--checkpoint 'corrupt.pt'", "not a readable torch checkpoint"]),
    ("mismatched-keys", [*MODEL, *DATA, "--checkpoint", "mismatched.pt"], 2,
     ["does not match the model", "missing keys ['3.bias']", "unexpected keys ['extra.weight']"]),
    ("nan-in-weights", [*MODEL, *DATA, "--checkpoint", "nan.pt"], 2,
     ["non-finite weights", "'0.weight' (1 NaN, 0 inf)"]),
    ("unresolvable-import-path", ["--model", "no_such_package.models:make", *DATA], 2,
     ["--model 'no_such_package.models:make'", "cannot import module"]),
    ("factory-raises", ["--model", "lw_user_models:broken_model", *DATA], 1,
     ["--model 'lw_user_models:broken_model' raised RuntimeError", "boom"]),
    ("data-yields-nothing", [*MODEL, "--data", "lw_user_models:no_batches"], 2,
     ["--data 'lw_user_models:no_batches' yielded no batches"]),
    ("unknown-device", [*MODEL, *DATA, "--device", "warp9"], 2,
     ["--device 'warp9' is not a device torch knows"]),
    ("out-holds-earlier-results", [*MODEL, *DATA, "--out", "earlier"], 2,
     ["--out 'earlier' already holds earlier results (report.json)", "--force"]),
]  # fmt: skip

#: Runs that succeed or fail on purpose, next to the cases: the same folder of earlier
#: results with --force, and a failure under --debug.
EXTRA = {
    "force": [*MODEL, *DATA, "--out", "forced", "--force", "--format", "json"],
    "debug": ["--model", "lw_user_models:broken_model", *DATA],
}

#: More bad input, checked in-process through the same dispatcher
#: (`layerwise.experiments.cli.main`), which spares a torch import per case.
IN_PROCESS = [
    ("checkpoint-without-state-dict", [*MODEL, *DATA, "--checkpoint", "no_state.pt"], 2,
     ["no state dict", "'optimizer'"]),
    ("checkpoint-holding-a-tensor", [*MODEL, *DATA, "--checkpoint", "tensor.pt"], 2,
     ["holds a Tensor, not a state dict"]),
    ("checkpoint-holding-a-module", [*MODEL, *DATA, "--checkpoint", "module.pt"], 2,
     ["holds a torch.nn.modules.linear.Linear object, which weights_only=True refuses",
      "save the model's state_dict() instead"]),
    ("bundled-model-on-wrong-data", ["--model", "mlp", *DATA], 1,
     ["the default loss failed on the first batch: RuntimeError"]),
    ("shape-mismatch", [*MODEL, *DATA, "--checkpoint", "shapes.pt"], 2,
     ["shape mismatch '3.weight' checkpoint (5, 16) vs model (3, 16)"]),
    ("unresolvable-attribute", ["--model", "lw_user_models:no_such_factory", *DATA], 2,
     ["has no 'no_such_factory'"]),
    ("malformed-import-path", ["--model", "lw_user_models.make_model", *DATA], 2,
     ["'package.module:name'"]),
    ("factory-returns-no-module", ["--model", "lw_user_models:batches", *DATA], 2,
     ["returned a list, not a torch.nn.Module"]),
    ("data-not-iterable", [*MODEL, "--data", "lw_user_models:make_model"], 2,
     ["returned a Sequential, not an iterable of batches"]),
    ("loss-not-scalar", [*MODEL, *DATA, "--loss", "lw_user_models:per_example_loss"], 2,
     ["must return a scalar floating tensor, got a tensor of shape (32,)"]),
    ("unknown-dtype", [*MODEL, *DATA, "--dtype", "float16"], 2, ["--dtype", "'float16'"]),
    ("bad-groups-file", [*MODEL, *DATA, "--groups-file", "bad.toml"], 2,
     ["--groups-file 'bad.toml' is not valid TOML"]),
    ("missing-groups-file", [*MODEL, *DATA, "--groups-file", "none.toml"], 2,
     ["--groups-file 'none.toml': no such file"]),
    ("data-without-model", [*DATA], 2, ["--data needs --model"]),
    ("model-without-data", [*MODEL], 2, ["needs --data"]),
    ("force-without-out", [*MODEL, *DATA, "--force"], 2, ["--force needs --out"]),
    ("bad-probes", [*MODEL, *DATA, "--probes", "0"], 2, ["--probes", "positive integer"]),
    ("out-is-a-file", [*MODEL, *DATA, "--out", "corrupt.pt"], 2, ["is not a folder"]),
]  # fmt: skip
if not torch.cuda.is_available():
    IN_PROCESS.append(("cuda-unavailable", [*MODEL, *DATA, "--device", "cuda"], 2,
                       ["--device 'cuda': CUDA is not available"]))  # fmt: skip


def assert_one_line(code: int, out: str, err: str, expected_code: int, expected: list[str]):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("layerwise analyze: error: "), lines[0]
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert code == expected_code, (code, lines[0])
    assert out == ""


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Every subprocess run of this file, launched concurrently, once per test session (even
    under pytest-xdist); returns ({id: Run}, the user's folder)."""

    def produce(root):
        user_workspace(root)
        _write_bad_files(root)
        jobs = {cid: ["analyze", *args, *SMALL] for cid, args, _, _ in CASES}
        jobs["force"] = ["analyze", *EXTRA["force"], *SMALL]
        jobs["debug"] = ["--debug", "analyze", *EXTRA["debug"], *SMALL]
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {
                cid: pool.submit(run_cli, *argv, pythonpath=root) for cid, argv in jobs.items()
            }
            return {cid: f.result() for cid, f in futures.items()}

    return once(tmp_path_factory, "analyze-bad-input", produce)


@pytest.mark.parametrize(
    ("cid", "code", "expected"), [(c[0], c[2], c[3]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gives_one_line_and_exit_code(runs, cid, code, expected):
    proc = runs[0][cid]
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, code, expected)


@pytest.fixture
def in_workspace(runs, monkeypatch):
    workspace = runs[1]
    monkeypatch.chdir(workspace)
    monkeypatch.syspath_prepend(str(workspace))
    yield workspace
    sys.modules.pop("lw_user_models", None)


@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [(c[1], c[2], c[3]) for c in IN_PROCESS],
    ids=[c[0] for c in IN_PROCESS],
)
def test_more_bad_input_gives_one_line_and_exit_code(in_workspace, capsys, argv, code, expected):
    try:
        got = main(["analyze", *argv, *SMALL])
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    captured = capsys.readouterr()
    assert_one_line(got, captured.out, captured.err, code, expected)


class _Payload:
    """Unpickling this calls ``os.makedirs(folder)``: code run by merely loading a file."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return (os.makedirs, (self.folder,))


@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
def test_malicious_checkpoint_is_refused_without_running_its_code(in_workspace, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"model": _Payload(marker)}, tmp_path / "malicious.pt")
    code = main(["analyze", *MODEL, *DATA, "--checkpoint", str(tmp_path / "malicious.pt"), *SMALL])
    captured = capsys.readouterr()
    assert_one_line(code, captured.out, captured.err, 2, ["holds a os.makedirs object",
                                                          "weights_only=True refuses"])  # fmt: skip
    assert not marker.exists()
    torch.load(tmp_path / "malicious.pt", weights_only=False)  # the payload is live
    assert marker.is_dir()


def test_debug_shows_the_traceback(runs):
    proc = runs[0]["debug"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "boom: the factory cannot build the model" in proc.stderr


def test_refused_out_folder_is_left_untouched(runs):
    assert runs[0]["out-holds-earlier-results"].returncode == 2
    earlier = runs[1] / "earlier"
    assert sorted(p.name for p in earlier.iterdir()) == ["notes.txt", "report.json"]
    assert (earlier / "report.json").read_text() == '{"earlier": true}\n'


def test_force_replaces_only_the_files_it_writes(runs):
    """The same folder of earlier results as the refused case, with --force: report.json is
    replaced, the other outputs written, the user's notes kept, no temporary file left."""
    proc, forced = runs[0]["force"], runs[1] / "forced"
    assert proc.returncode == 0, proc.stderr
    assert (forced / "notes.txt").read_text() == "my notes\n"
    assert json.loads((forced / "report.json").read_text()) == json.loads(proc.stdout)
    assert sorted(p.name for p in forced.iterdir()) == sorted([*OUTPUT_FILES, "notes.txt"])
