"""`--backend ray`: every run a Ray task, the same results as the local backend, and the
same resume, lock and manifest rules; a missing Ray is one line naming the extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from layerwise.experiments.cli import main
from layerwise.experiments.config import load_config
from layerwise.experiments.errors import UsageError
from layerwise.experiments.runner import ablate

from .ablations import TINY, finished_runs, result_files

#: What differs between backends in a done marker, besides the timings.
EXECUTION = ("backend", "host")


def _without_execution(files: dict) -> dict:
    return {
        name: (
            {k: v for k, v in content.items() if k not in EXECUTION}
            if name.endswith("done.json")
            else content
        )
        for name, content in files.items()
    }


#: The runs kept from the local ablation before `--backend ray` resumes the folder.
KEPT = (
    "tune__digits_mlp__curvature__default__lr0.01__s100",
    "final__digits_mlp__uniform__default__s1",
)


@pytest.mark.slow
def test_ray_resumes_a_local_folder_to_the_same_results(tiny_ablation, tmp_path, capsys):
    """One local Ray (started and shut down by the command): the runs it redoes equal the
    local backend's bit for bit (manifests whole, metrics without their timings), the
    finished ones are skipped untouched, and a changed config is refused as locally."""
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    shutil.copytree(tiny_ablation, out)
    for run in (out / "runs").iterdir():
        if run.name not in KEPT:
            shutil.rmtree(run)
    kept = finished_runs(out)
    assert sorted(kept) == sorted(KEPT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = ["ablate", str(TINY), "--out", str(out), "--no-report", "--no-progress"]
    assert main([*args, "--backend", "ray", "--workers", "2"]) == 0
    assert not ray.is_initialized(), "the Ray it started is shut down"
    assert "8 runs: 6 ran, 2 already done, 0 failed" in capsys.readouterr().out

    ours, local = result_files(out), result_files(tiny_ablation)
    assert sorted(ours) == sorted(local), "the same files"
    ours, local = _without_execution(ours), _without_execution(local)
    for name, content in local.items():
        assert ours[name] == content, f"{name} differs from the local backend's"
    after = finished_runs(out)
    assert {k: after[k] for k in KEPT} == kept, "finished runs skipped, untouched"
    backends = {
        p.parent.name: json.loads(p.read_text())["backend"] for p in out.glob("runs/*/done.json")
    }
    assert backends == {run: "local" if run in KEPT else "ray" for run in backends}

    changed = tmp_path / "changed.toml"
    changed.write_text(TINY.read_text().replace("seeds = [0, 1]", "seeds = [0, 2]"))
    with pytest.raises(UsageError, match="holds results of another config"):
        ablate(load_config(changed), out, backend="ray", progress=False, report=False)
    assert finished_runs(out) == after


BLOCKED_RAY = """
import sys


class Block:  # `import ray` fails as it does where Ray is not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Block())
from layerwise.experiments.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_missing_ray_is_one_line_naming_the_extra(tmp_path):
    """With ``import ray`` blocked, `--backend ray` names the extra and writes nothing."""
    out = tmp_path / "out"
    args = ["ablate", str(TINY), "--out", str(out), "--backend", "ray", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RAY, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "layerwise ablate: error: ray is not installed (extra 'ray'): "
        "pip install 'layerwise-lr[ray]'"
    ]
    assert not out.exists(), "nothing written"


def test_an_address_without_ray_and_an_unknown_backend_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["ablate", str(TINY), "--out", str(out), "--address", "head:6379"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--address 'head:6379' needs --backend ray" in err[0]
    with pytest.raises(ValueError, match=r"backend must be one of \['local', 'ray'\], got 'dask'"):
        ablate(load_config(TINY), out, backend="dask")
    with pytest.raises(ValueError, match="address 'head:6379' needs backend 'ray'"):
        ablate(load_config(TINY), out, address="head:6379")
    assert not out.exists()
