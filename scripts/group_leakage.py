"""How much plain stratified folds overstate validation accuracy on grouped data (issue 20,
point 7): the two arms of tests/test_group_leakage.py (same data builder, same steps) and a
markdown table of their numbers.

  .venv/bin/python scripts/group_leakage.py                 # seed 0, results in a temporary folder
  .venv/bin/python scripts/group_leakage.py --seed 3 --out /tmp/gl   # another data draw, kept

Data: 10 digit classes x 10 patients (6 in the pool, 4 in the test split), 6 near-duplicate
views per patient (tests/grouped_digits.py). "plain": data.columns.group: null; "group": the
group column (StratifiedGroupKFold). The gap is the fine-tunes' mean own-fold val accuracy
minus their mean test accuracy. CPU, about a minute on 2 idle cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the data builder and the arms, shared with the test

import grouped_digits as gd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=gd.SEED, help="the data's seed (the views, the patients drawn)")
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs")
    parser.add_argument("--out", type=Path, help="a folder for the data and both results folders (default: temporary)")
    parser.add_argument("--quiet", action="store_true", help="no step logs, only the table")
    args = parser.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="group-leakage-") as tmp:
        base = args.out or Path(tmp)
        manifest = gd.write_grouped_manifest(base / "data", args.seed)
        if args.quiet:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                results = [gd.run_arm(base / arm, manifest, arm, args.epochs) for arm in gd.ARMS]
        else:
            results = [gd.run_arm(base / arm, manifest, arm, args.epochs) for arm in gd.ARMS]
    n = len(gd.DIGITS)
    print(f"\n{n} classes x {gd.POOL_GROUPS} pool + {gd.TEST_GROUPS} test groups x {gd.VIEWS} views, k = {gd.K}, "
          f"{args.epochs} epochs, data seed {args.seed}; gap = mean val acc (own fold) - mean test acc\n")
    print(gd.table(results))
    print(f"\n{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
