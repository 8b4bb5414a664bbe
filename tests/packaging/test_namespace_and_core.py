"""What a user's project sees of ours: one namespace (``layerwise.*``), a small core, and a
command line that finds the user's modules in the current folder.

* The wheel holds nothing but ``layerwise/...`` and its metadata, the bundled configs
  included, and its core requirements are torch, numpy, scipy and pandas only.
* A user's own ``engine.py`` and ``experiments/`` shadow nothing of ours, and
  ``layerwise analyze --model mymodule:build --data mymodule:batches`` run from their folder
  finds ``mymodule`` without ``PYTHONPATH``.
* Importing the core loads none of the optional packages (nor pandas); a missing optional
  package gives the command line one line naming the extra.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("matplotlib", "rich", "sklearn", "mnist1d", "pyarrow")
#: The other extras' packages: trainer integrations (imported by layerwise.engine.lightning and
#: layerwise.engine.huggingface only), the Ray backend, the model zoo.
OTHER_EXTRAS = (
    "lightning", "pytorch_lightning", "transformers", "accelerate", "ray", "timm", "torchvision",
)  # fmt: skip

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


    def batches():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g))]
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A user's project: its own engine.py, an experiments/ package and mymodule.py."""
    (tmp_path / "engine.py").write_text("WHO = 'the user'\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("WHO = 'the user'\n")
    (tmp_path / "mymodule.py").write_text(USER_MODULE)
    return tmp_path


def test_user_modules_shadow_nothing_of_ours(user_folder):
    code = (
        "from layerwise.engine import LayerwiseOptimizer\n"
        "from layerwise.experiments import __version__\n"
        "import engine, experiments\n"
        "print(engine.WHO, experiments.WHO, LayerwiseOptimizer.__module__)\n"
    )
    out = _run([sys.executable, "-c", code], user_folder)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["the", "user", "the", "user", "layerwise.engine.optimizer"]


@pytest.mark.slow
def test_cli_finds_the_users_module_without_pythonpath(user_folder):
    layerwise = Path(sys.executable).with_name("layerwise")
    args = [str(layerwise), "analyze", "--model", "mymodule:build", "--data", "mymodule:batches"]
    out = _run([*args, "--probes", "2", "--out", "analysis"], user_folder)
    assert out.returncode == 0, out.stderr
    assert (user_folder / "analysis").is_dir() and any((user_folder / "analysis").iterdir())
    missing = _run([*args[:3], "nomodule:build", *args[4:], "--out", "x"], user_folder)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "cannot import module 'nomodule'" in missing.stderr


def test_bundled_configs_are_ours_from_any_folder(user_folder):
    """`layerwise ablate quickstart` outside the repository, next to a user's own
    experiments/ package: the bundled configs are found in layerwise.experiments."""
    layerwise = Path(sys.executable).with_name("layerwise")
    unknown = _run([str(layerwise), "ablate", "nosuch", "--out", "x"], user_folder)
    assert unknown.returncode == 2, unknown.stderr
    assert unknown.stderr == (
        "layerwise ablate: error: config 'nosuch' is neither a file nor a bundled config "
        "(control, full, quickstart, regimes, tiny)\n"
    )
    code = (
        "from layerwise.experiments.commands.ablate import resolve_config_path\n"
        "print(resolve_config_path('tiny').read_text().splitlines()[1])\n"
    )
    found = _run([sys.executable, "-c", code], user_folder)
    assert found.returncode == 0, found.stderr
    assert found.stdout == 'name = "tiny"\n'
    assert not (user_folder / "x").exists()


def test_importing_the_core_loads_no_optional_package():
    code = (
        "import sys\n"
        "import layerwise.sensitivity, layerwise.policies, layerwise.engine\n"
        f"print([m for m in {(*EXTRAS, *OTHER_EXTRAS, 'pandas')!r} if m in sys.modules])\n"
    )
    out = _run([sys.executable, "-c", code], ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


#: Runs the CLI with the optional packages made unimportable, as on a core-only install.
BLOCKED_CLI = textwrap.dedent(
    """
    import sys
    BLOCK = set(sys.argv[1].split(","))
    class Block:
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    from layerwise.experiments.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    blocked = [sys.executable, "-c", BLOCKED_CLI, ",".join(EXTRAS)]
    groups = _run([*blocked, "groups", "--model", "mlp"], tmp_path)
    assert groups.returncode == 0, groups.stderr  # the core commands need no extra
    report = _run([*blocked, "report", str(tmp_path)], tmp_path)
    assert report.returncode == 1
    assert report.stderr == (
        "layerwise report: error: matplotlib is not installed (extra 'experiments'): "
        "pip install 'layerwise-lr[experiments]'\n"
    )


#: Imports a trainer integration with its package made unimportable.
BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib, sys
    class Block:
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == sys.argv[1]:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
    try:
        importlib.import_module(sys.argv[2])
    except ImportError as err:
        print(type(err).__name__, err, sep=": ")
    """
)


@pytest.mark.parametrize(
    ("blocked", "module", "extra"),
    [
        ("lightning", "layerwise.engine.lightning", "lightning"),
        ("transformers", "layerwise.engine.huggingface", "huggingface"),
    ],
)
def test_a_missing_trainer_extra_is_one_line_naming_it(blocked, module, extra):
    out = _run([sys.executable, "-c", BLOCKED_IMPORT, blocked, module], ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        f"MissingExtraError: {blocked} is not installed (extra {extra!r}): "
        f"pip install 'layerwise-lr[{extra}]'\n"
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout stays untouched)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "sensitivity", "policies", "engine", "experiments"):
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    proc = _run([sys.executable, "-c", code], source)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_wheel_installs_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"layerwise", next(t for t in tops if t.endswith(".dist-info"))}
    packages = {n.split("/")[1] for n in names if n.startswith("layerwise/")}
    assert packages == {"sensitivity", "policies", "engine", "experiments"}
    assert "layerwise/__init__.py" not in names  # an implicit namespace package
    assert "layerwise/experiments/configs/quickstart.toml" in names
    assert not any(n.startswith("layerwise/tests") for n in names)


@pytest.mark.slow
def test_the_core_requirements_are_the_four(wheel):
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith("/METADATA")))
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = sorted(re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in requires if "extra ==" not in r)
    assert core == ["numpy", "pandas", "scipy", "torch"]
    extras = {r.split("extra ==")[1].strip().strip("\"'") for r in requires if "extra ==" in r}
    assert extras == {"experiments", "lightning", "huggingface", "ray", "zoo", "dev"}
