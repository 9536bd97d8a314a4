# foldsoup: a hyperparameter grid x k folds of fine-tuned models -> model soups, with the
# reliability analysis of Suzuki & Matsuzawa (2022). The rules are wiring; the work is in src/.
import os
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)

from foldsoup.config import results_folder
from foldsoup.errors import ConfigError
from foldsoup.config.schema import validate


configfile: "config.yaml"


# Validate the merged configuration (config.yaml + --configfile + --config) before any job is
# scheduled; defaults from the schema are filled in. A results folder holds one run (one
# dataset, one model): another is refused here.
try:
    config.update(validate(config))
    results_folder.check(config)
except ConfigError as err:
    sys.exit(f"foldsoup: {err}")

# Jobs run `python -m foldsoup`: this interpreter (a conda env, when used, comes first in PATH)
# with this checkout's library on the path, locally and on cluster nodes alike.
# (Set here, not required from the user: hence no `envvars:` directive.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
    PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/import.smk"
include: "workflow/rules/soups.smk"
include: "workflow/rules/budget.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.models_table.output,
        rules.methods.output,
        rules.reliability.output,
        rules.figures.output,
        rules.summary.output,
        rules.ship.output,
        rules.budget_table.output if config["budget"]["enabled"] else [],
    default_target: True


# Local runs: one job server pays the torch import once for all jobs (foldsoup.zygote).
# onstart runs only for real (not dry) runs; cluster executors run their jobs elsewhere. A job
# of another interpreter (--sdm conda, apptainer) runs itself: the server says which it is.
# The server removes its socket folder when it stops.
onstart:
    results_folder.record(config)
    # GPUs asked for but not visible: say so once here (device: auto would train every job on
    # the CPU), or stop before any job (device: cuda). Local runs only: a login node has none.
    if workflow.local_exec:
        from foldsoup.devices import start_check

        gpu_slots = workflow.global_resources.get("gpu")
        warning, error = start_check(config["device"], getattr(gpu_slots, "value", gpu_slots))
        if warning:
            print(f"foldsoup: warning: {warning}", file=sys.stderr)
        if error:
            sys.exit(f"foldsoup: {error}")
    if config["local_job_server"] and workflow.local_exec:
        import subprocess
        import tempfile

        socket_path = os.path.join(tempfile.mkdtemp(prefix="foldsoup-"), "jobs.sock")
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "foldsoup.zygote",
                socket_path,
                "--parent-pid",
                str(os.getpid()),
                "--remove-dir",
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
        )
        os.environ.update(FOLDSOUP_JOB_SERVER=socket_path)


# The run's last word on the console: where summary.md is, the model to ship (path, method, val
# with what it is worth, test) and the warnings that matter (models at chance, diverged, ...);
# after a failure, how to resume. Never after a dry run.
onsuccess:
    from foldsoup.report.console import end_of_run

    for line in end_of_run(R, config["soups"]["ship"]):
        print(line)


onerror:
    from foldsoup.report.console import end_of_run

    for line in end_of_run(R, config["soups"]["ship"], failed=True):
        print(line, file=sys.stderr)
