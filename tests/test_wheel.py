"""The wheel a user installs with ``pip install .``: built from the package's own files, installed into a
scratch environment, and checked there, outside the repository.

The scratch environment borrows this environment's dependencies (torch, transformers, ...) through a
``.pth`` line, so nothing is downloaded; the package itself comes only from the wheel: this environment's
editable install is not active there (a ``.pth`` line adds a folder, it does not run the folder's own
``.pth`` files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(ROOT / "alphaedit_plugin" / "shipped_hparams").as_posix()
                 for p in (ROOT / "alphaedit_plugin" / "shipped_hparams").rglob("*.yaml"))

CHECK = r"""
import json, pathlib, sys
import alphaedit_plugin
from alphaedit_plugin import registry
from alphaedit_plugin.bench.methods import default_hparams_path
from alphaedit_plugin.demo import DEFAULT_HPARAMS

package = pathlib.Path(alphaedit_plugin.__file__).resolve().parent
files = sorted(p.relative_to(registry.HPARAMS_ROOT).as_posix() for p in registry.HPARAMS_ROOT.rglob("*.yaml"))
loaded = {f: type(registry.load_hparams(registry.HPARAMS_ROOT / f)).__name__ for f in files}
print(json.dumps({"package": str(package), "files": files, "loaded": loaded,
                  "demo_default": str(DEFAULT_HPARAMS.resolve()), "demo_default_exists": DEFAULT_HPARAMS.is_file(),
                  "bench_default": str(default_hparams_path("MEMIT+P", "smollm2"))}))
"""


def run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def scratch_environment(tmp_path_factory):
    """``(python, environment folder, wheel)``: a fresh venv holding the package only as the wheel built here."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "alphaedit_plugin", source / "alphaedit_plugin",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-w", str(work / "dist"), str(source)])
    wheel = next((work / "dist").glob("alphaedit_plugin-*.whl"))

    environment = work / "env"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)], env=clean_env())
    # After the install: pip would otherwise see this environment's editable install as already there.
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, environment, wheel


def clean_env() -> dict:
    """No PYTHONPATH (the tests put the repository and the EasyEdit source on it): only the wheel is there."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_the_wheel_carries_every_shipped_yaml(scratch_environment):
    import zipfile

    _, _, wheel = scratch_environment
    names = zipfile.ZipFile(wheel).namelist()
    carried = sorted(n.split("alphaedit_plugin/shipped_hparams/", 1)[1] for n in names
                     if n.startswith("alphaedit_plugin/shipped_hparams/") and n.endswith(".yaml"))
    assert carried == SHIPPED and len(SHIPPED) >= 30


def test_the_installed_wheel_finds_and_loads_its_yaml_outside_the_repository(scratch_environment, tmp_path):
    python, environment, _ = scratch_environment
    result = run([str(python), "-c", CHECK], cwd=tmp_path, env=clean_env())
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(environment)  # the wheel's copy, not the checkout
    assert report["files"] == SHIPPED
    assert report["loaded"]["AlphaEdit/smollm2-135m.yaml"] == "AlphaEditHyperParams"
    assert report["loaded"]["MEMIT/llama3-8b-projected.yaml"] == "MEMITHyperParams"
    assert report["demo_default_exists"] and Path(report["demo_default"]).is_relative_to(environment)
    assert Path(report["bench_default"]).is_relative_to(environment)
    assert report["bench_default"].endswith("MEMIT/smollm2-135m-projected.yaml")


@pytest.mark.parametrize("command", ["alphaedit-demo", "alphaedit-bench"])
def test_the_installed_commands_start(scratch_environment, tmp_path, command):
    python, environment, _ = scratch_environment
    result = run([str(environment / "bin" / command), "--help"], cwd=tmp_path, env=clean_env())
    assert "usage:" in result.stdout and "--dtype" in result.stdout
