"""The package's layers (pyproject.toml, [tool.importlinter]) hold, checked by import-linter:
each folder imports only from the layers below it (function-local imports count), no folder's
modules import each other in a cycle, and the library never imports Snakemake.

The contracts are also shown to fail: on a copy of the package with one upward import, one
in-folder cycle, one Snakemake import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers_and_has_no_cycles():
    result = lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # data sits below soups: a dataset reader may not reach for soup selection.
    ("data/folds.py", "from foldsoup.soups import select", "Layers:"),
    # classifier <-> build: a cycle inside models/, hidden in a function as it used to be.
    ("models/classifier.py", "def _f():\n    from foldsoup.models import build", "No import cycles"),
    ("soups/average.py", "import snakemake", "never imports Snakemake"),
])
def test_a_violation_breaks_its_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "src" / "foldsoup", tmp_path / "foldsoup", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "foldsoup" / module, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    report = result.stdout.split("Broken contracts", 1)[1]
    assert broken in report, result.stdout
