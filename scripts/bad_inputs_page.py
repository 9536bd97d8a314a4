"""docs/bad-inputs.md: the message the configuration check gives for each bad value that
tests/test_config.py checks (its CASES), as `validate` writes it today.

    python scripts/bad_inputs_page.py          rewrites the page
    python scripts/bad_inputs_page.py --check  exits 1 when the page is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "bad-inputs.md"

HEADER = """# Bad inputs and what foldsoup says

Every bad value of the configuration is refused when Snakemake reads the workflow, before any job,
in one line that names the key, the value and what is allowed. Below: the overlay given on top of
the embedded `config.yaml`, and the line printed. This page is generated from the cases of
`tests/test_config.py` (`python scripts/bad_inputs_page.py`), so each line is one a test checks.

The errors for bad files (datasets, folds.csv, weights, checkpoints handed to `foldsoup evaluate`
and `predict`) name the file and what to give instead; they are checked in `tests/test_inputs.py`,
`tests/test_datasets.py` and `tests/test_holdout.py`.

| overlay | message |
|---|---|
"""


def render() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_config import CASES

    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files
    from foldsoup.errors import ConfigError

    base = load_yaml_files(ROOT / "config.yaml")
    base["folds"]["holdout_fraction"] = 0  # as the tests' base
    rows, here = [], os.getcwd()
    with tempfile.TemporaryDirectory() as empty:
        os.chdir(empty)  # paths in the cases resolve against an empty folder, as in the tests
        try:
            for override, _ in CASES:
                try:
                    validate(deep_update(base, override))
                except ConfigError as exc:
                    problems = [line.removeprefix("  - ") for line in str(exc).splitlines()[1:]]
                else:
                    raise SystemExit(f"bad_inputs_page: {override} is accepted; tests/test_config.py expects an error")
                cell = "<br>".join(p.replace("|", "\\|") for p in problems).replace(empty, "<cwd>")
                rows.append(f"| `{json.dumps(override)}` | {cell} |")
        finally:
            os.chdir(here)
    return HEADER + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/bad-inputs.md is not what render() gives")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run python scripts/bad_inputs_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
