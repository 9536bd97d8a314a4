# foldsoup: a hyperparameter grid x k folds of fine-tuned models -> model soups, with the
# reliability analysis of Suzuki & Matsuzawa (2022). The rules are wiring; the work is in src/.
import os
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)

from foldsoup.config import ConfigError, validate


configfile: "config.yaml"


# Validate the merged configuration (config.yaml + --configfile + --config) before any job is
# scheduled; defaults from the schema are filled in.
try:
    config.update(validate(config))
except ConfigError as err:
    sys.exit(f"foldsoup: {err}")

# Jobs run `python -m foldsoup`: this interpreter (a conda env, when used, comes first in PATH)
# with this checkout's library on the path, locally and on cluster nodes alike.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/soups.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.models_table.output,
        rules.methods.output,
        rules.reliability.output,
        rules.figures.output,
        rules.summary.output,
    default_target: True
