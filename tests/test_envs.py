"""The conda environment of the rules (--sdm conda) and the pip pins stay in step."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return {re.split(r"==", line)[0].lower().replace("_", "-"): line.split("==")[1] for line in lines if "==" in line}


def _env() -> tuple[list[str], list[str]]:
    """envs/foldsoup.yaml parsed: (its conda dependencies, its pip requirements)."""
    env = yaml.safe_load((ROOT / "envs" / "foldsoup.yaml").read_text())
    assert env["name"] == "foldsoup" and "conda-forge" in env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    sections = [d for d in env["dependencies"] if not isinstance(d, str)]
    assert len(sections) == 1 and list(sections[0]) == ["pip"], sections
    return conda, sections[0]["pip"]


def test_conda_env_pins_equal_requirements():
    conda, pip = _env()
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert _pins(pip) == _pins(reqs)
    assert "python=3.11" in conda and "pip" in conda


def test_every_rule_names_an_existing_conda_env():
    rules = list((ROOT / "workflow" / "rules").glob("*.smk"))
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    env_path = re.search(r'^ENV = "(.+)"', common, re.M).group(1)
    assert (ROOT / "workflow" / "rules" / env_path).resolve() == (ROOT / "envs" / "foldsoup.yaml")
    for path in rules:
        text = path.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, re.M))
        assert text.count("conda:\n        ENV") == n_rules, f"{path.name}: every rule must name the conda env"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line]
    for name, pinned in _pins(reqs).items():
        assert version(name) == pinned, name


def test_conda_jobs_keep_the_library_path():
    """Under --sdm conda Snakemake drops PYTHONPATH from jobs unless told not to, and jobs find
    foldsoup (src/) only through it (envs/foldsoup.yaml does not install the checkout)."""
    for profile in ("default", "slurm"):
        cfg = yaml.safe_load((ROOT / "profiles" / profile / "config.yaml").read_text())
        assert cfg.get("conda-not-block-search-path-envvars") is True, profile
    conda, pip = _env()
    assert [d for d in conda + pip if "foldsoup" in d.lower() or d.startswith(("-e", ".", "/"))] == []
