"""Benchmarks (not tests): throughput of training, evaluation and soup evaluation, the fraction
of the compute-bound peak, per-job start-up, the demo's per-rule breakdown and how the DAG
scales with k and the grid. Prints Markdown; `--json PATH` also writes the numbers.

  .venv/bin/python scripts/bench.py                       # embedded default model, this device
  .venv/bin/python scripts/bench.py --model vit-b-32      # CLIP ViT-B/32 (use on a GPU)
  .venv/bin/python scripts/bench.py --demo-results results   # + per-rule breakdown of a finished demo
  .venv/bin/python scripts/bench.py --compile             # + training through torch.compile (finetune.compile)
  .venv/bin/python scripts/bench.py --soup-stage results   # + the soup stage's reads and forward passes (counters),
                                                          #   before (--soup-before REV) and after this checkout's code
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# FOLDSOUP_BENCH_SRC: another checkout's library (the soup stage's reads before a change).
sys.path.insert(0, os.environ.get("FOLDSOUP_BENCH_SRC") or str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from foldsoup.training.augment import eval_transform  # noqa: E402
from foldsoup.models.build import build_classifier  # noqa: E402
from foldsoup.soups.average import RunningSum  # noqa: E402
from foldsoup.training.loop import ImageSpec, LoopConfig, predict_logits, train  # noqa: E402

MODELS = {
    "digits_cnn": dict(cfg={"name": "digits_cnn", "width": 16, "normalize_features": False}, shape=(1, 8, 8), size=8,
                       classes=5, batch=32, eval_batch=1024, n_train=512),
    "vit-b-32": dict(cfg={"name": "open_clip", "arch": "ViT-B-32", "pretrained": "openai", "normalize_features": True},
                     shape=(3, 32, 32), size=224, classes=10, batch=256, eval_batch=1024, n_train=4096),
}
AUG = {"scale": [0.6, 1.0], "rotate": 10, "translate": 0.1, "jitter": 0.2, "erase": 0.0}
# Dense bf16 peak (no sparsity) of GPUs we know; others are measured with a matmul.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_image(model, spec, shape, device) -> float:
    """Forward FLOPs of one image (torch's flop counter: 2 per multiply-add). Counted with
    autograd on: under no_grad, nn.MultiheadAttention takes its fused fast path, which the
    counter does not see (a third of ViT-B/32's FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = eval_transform(torch.zeros((2, *shape), dtype=torch.uint8, device=device), spec.size, spec.mean, spec.std)
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        model(x)
    return counter.get_total_flops() / 2


def measured_peak(device, dtype) -> float:
    """FLOP/s of a large square matmul: the compute-bound ceiling this device reaches."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 50 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def bench_model(name: str, device: torch.device, precision: str) -> dict:
    m = MODELS[name]
    torch.manual_seed(0)
    model = build_classifier(m["cfg"], m["classes"]).to(device)
    channels = m["shape"][0]
    spec = ImageSpec(m["size"], [0.5] * channels, [0.25] * channels, True)
    images = torch.randint(0, 256, (m["n_train"], *m["shape"]), dtype=torch.uint8, device=device)
    labels = torch.randint(0, m["classes"], (m["n_train"],), device=device)
    loop = LoopConfig(2, m["batch"], 1e-4, 0.1, 10, 1.0, 0.0, precision, AUG, 0.4, 0, "bench")
    warm = dataclasses.replace(loop, epochs=1)
    train(model, images[: m["batch"] * 2], labels[: m["batch"] * 2], spec, warm, lambda s: None)
    sync(device)
    stats = train(model, images, labels, spec, loop, lambda s: None)
    train_ips = stats["images_per_s"]

    predict_logits(model, images[:64], spec, m["eval_batch"], precision)
    sync(device)
    t = time.perf_counter()
    predict_logits(model, images, spec, m["eval_batch"], precision)
    sync(device)
    eval_ips = m["n_train"] / (time.perf_counter() - t)

    # Soups per second: swap a running-sum mean into the resident model and evaluate a val set.
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(3)]
    acc = RunningSum()
    acc.add(states[0])
    val = images[: min(len(images), 2048)]
    t = time.perf_counter()
    n_soups = 5
    for i in range(n_soups):
        soup = acc.mean_with(states[1 + i % 2])
        model.load_state_dict(soup)
        predict_logits(model, val, spec, m["eval_batch"], precision)
    sync(device)
    soups_per_s = n_soups / (time.perf_counter() - t)

    fwd = flops_per_image(model, spec, m["shape"], device)
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    known = next((v for k, v in KNOWN_PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    peak = known * 1e12 if known and dtype == torch.bfloat16 else measured_peak(device, dtype)
    return {
        "model": name, "device": device_name(device), "precision": precision,
        "train_images_per_s": train_ips, "eval_images_per_s": eval_ips,
        "soups_per_s": soups_per_s, "soup_val_images": len(val),
        "forward_gflop_per_image": fwd / 1e9,
        "peak_tflops": peak / 1e12, "peak_source": "spec sheet" if known and dtype == torch.bfloat16 else "measured matmul",
        "train_fraction_of_peak": train_ips * 3 * fwd / peak,
        "eval_fraction_of_peak": eval_ips * fwd / peak,
    }


def bench_compile(name: str, device: torch.device, precision: str) -> dict:
    """finetune.compile: what torch.compile costs once per job and gains per image."""
    m = MODELS[name]
    channels = m["shape"][0]
    spec = ImageSpec(m["size"], [0.5] * channels, [0.25] * channels, True)
    images = torch.randint(0, 256, (m["n_train"], *m["shape"]), dtype=torch.uint8, device=device)
    labels = torch.randint(0, m["classes"], (m["n_train"],), device=device)
    out = {"model": name, "device": device_name(device), "precision": precision}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_classifier(m["cfg"], m["classes"]).to(device)
        loop = LoopConfig(3, m["batch"], 1e-4, 0.1, 10, 1.0, 0.0, precision, AUG, 0.4, 0, "bench", compile=compiled)
        epochs: list[float] = []
        log = lambda s: epochs.append(float(re.search(r"(\d+) images/s", s).group(1)))  # noqa: E731
        sync(device)
        t = time.perf_counter()
        train(model, images, labels, spec, loop, log)
        sync(device)
        key = "compiled" if compiled else "eager"
        out[f"{key}_first_epoch_s"] = m["n_train"] / epochs[0]
        out[f"{key}_images_per_s"] = sum(epochs[1:]) / len(epochs[1:])  # after the first epoch
        out[f"{key}_total_s"] = time.perf_counter() - t
    out["compile_overhead_s"] = out["compiled_first_epoch_s"] - out["eager_first_epoch_s"]
    return out


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def startup_seconds(repeats: int = 3) -> dict:
    """What every job pays before its first step: interpreter, imports, model build."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = {
        "python": "pass",
        "import torch": "import torch",
        "foldsoup job imports": "import foldsoup.steps, foldsoup.training.loop, foldsoup.models.classifier, torch",
        "+ build digits_cnn": "import foldsoup.models.build as m; m.build_classifier({'name':'digits_cnn','width':16,'normalize_features':False}, 5)",
    }
    out = {}
    for label, snippet in code.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", snippet], env=env, check=True)
            times.append(time.perf_counter() - t)
        out[label] = min(times)
    return out


def demo_breakdown(results: str) -> list[dict]:
    """Per-rule count, mean and total seconds from Snakemake's benchmark files."""
    import pandas as pd

    rows = {}
    for path in glob.glob(f"{results}/benchmarks/**/*.tsv", recursive=True):
        rule = Path(path).relative_to(Path(results) / "benchmarks").parts[0].removesuffix(".tsv")
        rows.setdefault(rule, []).append(float(pd.read_csv(path, sep="\t").s.iloc[0]))
    return [{"rule": r, "jobs": len(v), "mean_s": sum(v) / len(v), "total_s": sum(v)} for r, v in sorted(rows.items())]


def dag_scaling() -> list[dict]:
    """Job counts of the DAG for k in {3, 5, 10} and grids of 4 and 18 points (dry runs)."""
    grids = {4: {"lr": [0.002, 0.0005], "aug": ["minimal"], "mixup": [False, True]},
             18: {"lr": [0.002, 0.001, 0.0005], "aug": ["minimal", "medium", "strong"], "mixup": [False, True]}}
    out = []
    snakemake = str(Path(sys.executable).parent / "snakemake")
    for k in (3, 5, 10):
        for t, grid in grids.items():
            cap = 20 if k == 10 else None
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                json.dump({"folds": {"k": k}, "grid": grid, "analysis": {"max_subsets_per_n": cap},
                           "results": tempfile.mkdtemp(prefix="foldsoup-bench-")}, f)
            res = subprocess.run([snakemake, "-n", "--configfile", f.name, "--workflow-profile", "none"], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            counts = dict(re.findall(r"^(\w+)\s+(\d+)$", res.stdout, re.M))
            from foldsoup.analysis.reliability import fold_subsets

            out.append({"k": k, "grid_points": t, "finetune_jobs": int(counts.get("finetune", 0)),
                        "total_jobs": int(counts.get("total", 0)), "analysis_soups": t * len(fold_subsets(k, cap, 0)),
                        "subset_cap_per_n": cap})
    return out


# The last commit whose soup stage re-read weights and evaluated every greedy candidate in full.
SOUP_BEFORE = "b829d0c"


def soup_jobs(cfg: dict, results: str, out: Path, early_exit: bool | None) -> list[tuple[str, object]]:
    """The soup stage of a finished run, job by job as the workflow runs it (uniform_subsets,
    greedy_fold, soup_all, gsgs, budget), writing into `out`: (job, a call returning its cost
    counters, steps.log_cost). early_exit None: code from before soups.early_exit existed."""
    from foldsoup import steps as pl
    from foldsoup.analysis.budget import fold_counts
    from foldsoup.steps import budget
    from foldsoup.config.schema import grid_points

    exit_kw = {} if early_exit is None else {"early_exit": early_exit}
    if early_exit is not None:
        cfg = {**cfg, "soups": {**cfg["soups"], "early_exit": early_exit}}
    r, k = Path(results), cfg["folds"]["k"]
    data, folds = str(r / "prepared" / "dataset.safetensors"), str(r / "folds.csv")
    hps = [p.name for p in grid_points(cfg)]

    def files(name: str, hp: list[str] = hps, fold: list[int] = list(range(k))) -> list[str]:
        return [str(r / "models" / h / f"fold{i}" / name) for h in hp for i in fold]

    def soup(name: str) -> str:
        return str(out / "soups" / f"{name}.safetensors")

    jobs = [(f"uniform_subsets/{hp}", lambda hp=hp: pl.uniform_subsets(
        cfg, data, folds, hp, files("model.safetensors", [hp]), files("metrics.json", [hp]), str(out / f"{hp}.csv")))
        for hp in hps]
    jobs += [(f"greedy_fold/fold{i}", lambda i=i: pl.greedy_per_fold(
        cfg, data, folds, i, files("model.safetensors", fold=[i]), files("metrics.json", fold=[i]), soup(f"greedy_fold{i}"),
        soup(f"uniform_fold{i}"))) for i in range(k)]
    every = (files("model.safetensors"), files("metrics.json"))
    jobs += [("uniform_soup", lambda: pl.uniform_all(cfg, data, folds, *every, soup("uniform_soup"))),
             ("greedy_soup", lambda: pl.greedy_all(cfg, data, folds, *every, soup("greedy_soup")))]
    if cfg["folds"]["holdout_fraction"] > 0:
        jobs.append(("greedy_soup_holdout", lambda: pl.greedy_all(cfg, data, folds, *every, soup("greedy_soup_holdout"),
                                                                   on_holdout=True)))
    jobs.append(("gsgs", lambda: pl.gsgs(cfg, data, folds, [soup(f"greedy_fold{i}") for i in range(k)], soup("gsgs"))))
    if cfg["budget"]["enabled"]:
        jobs += [(f"budget/f{f}", lambda f=f: budget(cfg, data, folds, str(r / "models"), f,
                                                      str(out / f"budget_f{f}.csv"), **exit_kw))
                 for f in fold_counts(k, cfg["budget"]["fold_counts"])]
    return jobs


def _soup_cfg(results: str, config_files: list[str]) -> dict:
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files

    return validate(deep_update(load_yaml_files(*config_files), {"results": results}), check_paths=False)


def _quiet(run):
    """A job's cost, its log (stderr) dropped."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return run()


def soup_reads(results: str, config_files: list[str], cache_bytes: int | None) -> dict[str, dict]:
    """Weight files opened per soup job by whatever library is on sys.path, counted at
    safetensors.safe_open (load_weights opens each file with it). cache_bytes: set the old
    budget module's CACHE_BYTES (0: the demo's 5 MB of models behave like ViT-B/32's 31.6 GB)."""
    import safetensors

    import foldsoup.analysis.budget

    if cache_bytes is not None:
        foldsoup.analysis.budget.CACHE_BYTES = cache_bytes
    real, opened = safetensors.safe_open, []
    safetensors.safe_open = lambda path, *a, **kw: opened.append(str(path)) or real(path, *a, **kw)
    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="foldsoup-bench-reads-") as tmp:
        for job, run in soup_jobs(_soup_cfg(results, config_files), results, Path(tmp), None):
            opened.clear()
            _quiet(run)
            weights = [p for p in opened if not p.endswith(("dataset.safetensors", "predictions.safetensors"))]
            out[job] = {"reads": len(weights), "files": len(set(weights)), "bytes": sum(os.path.getsize(p) for p in weights)}
    return out


def soup_reads_before(rev: str, results: str, config_files: list[str]) -> dict[str, dict]:
    """soup_reads of commit `rev` (git archive of its library and schema, in a subprocess): as it
    ran the demo, and with its budget cache off, as for models over its 1 GiB cache."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="foldsoup-bench-before-") as tmp:
        tree = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src", "workflow/schemas"], check=True,
                              capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tree, check=True)
        for regime, cache in (("as_run", None), ("over_cache", 0)):
            path = Path(tmp) / f"{regime}.json"
            subprocess.run([sys.executable, __file__, "--soup-reads", results, "--soup-config", *config_files,
                            *([] if cache is None else ["--cache-bytes", str(cache)]), "--json", str(path)],
                           env={**os.environ, "FOLDSOUP_BENCH_SRC": str(Path(tmp) / "src")}, check=True)
            out[regime] = json.loads(path.read_text())
    return out


def soup_stage(results: str, config_files: list[str], before: str | None, batches_per_fold: int) -> list[dict]:
    """Every soup job of a finished run recomputed in this process (into a temporary folder):
    weight files and bytes read, before (commit `before`, see soup_reads_before) and now; val
    images evaluated with full evaluation (soups.early_exit: false, what Alg. 1 did before) and
    with early exit, at the run's eval batch size and at `batches_per_fold` batches per val fold
    (the paper preset: 10,000-image folds in batches of 1,024, about 10). All from counters (the
    jobs' steps.log_cost, safetensors.safe_open), no timings; the soups are the same either
    way (tests/test_early_exit.py)."""
    import math

    cfg = _soup_cfg(results, config_files)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workflow's soup jobs run (Snakemake sets OMP_NUM_THREADS=1)
    folds = np.loadtxt(Path(results) / "folds.csv", delimiter=",", skiprows=1, usecols=2, dtype=int)
    batch = math.ceil(np.bincount(folds[folds >= 0]).mean() / batches_per_fold)
    paper_like = {**cfg, "finetune": {**cfg["finetune"], "eval_batch_size": batch}}
    passes = {"full": (cfg, False), "early": (cfg, True), f"early_batch{batch}": (paper_like, True)}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="foldsoup-bench-soups-") as tmp:
        for name, (c, early_exit) in passes.items():
            for job, run in soup_jobs(c, results, Path(tmp) / name, early_exit):
                cost = _quiet(run)
                row = rows.setdefault(job, {"job": job, "files": cost["files"], "reads": cost["reads"],
                                            "MB_read": cost["bytes_read"] / 1e6, "test_images": cost["test_images"]})
                assert (row["files"], row["reads"]) == (cost["files"], cost["reads"]), job  # reads do not depend on early exit
                row[f"val_images_{name}"] = cost["val_images"]
    torch.set_num_threads(threads)
    old = soup_reads_before(before, results, config_files) if before else {}
    out = []
    for job, row in rows.items():
        for regime, reads in old.items():
            row[f"reads_before_{regime}"] = reads[job]["reads"]
            row[f"MB_before_{regime}"] = reads[job]["bytes"] / 1e6
        out.append(row)
    total = {"job": "all soup jobs", **{key: sum(r[key] for r in out) for key in out[0] if key != "job"}}
    return out + [total]


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="digits_cnn")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPUs, fp32 on CPUs")
    p.add_argument("--demo-results", help="a finished run's results folder, for the per-rule breakdown")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time training through torch.compile")
    p.add_argument("--soup-stage", metavar="RESULTS", help="a finished run's results folder: its soup stage's reads and "
                   "images evaluated, with full evaluation and with early exit (counters)")
    p.add_argument("--soup-config", nargs="+", default=[str(ROOT / "config.yaml")],
                   help="the configuration files of that run (default: config.yaml, the demo)")
    p.add_argument("--soup-before", default=SOUP_BEFORE, help=f"the commit to count reads before (default {SOUP_BEFORE}; "
                   "'' skips it)")
    p.add_argument("--soup-batches-per-fold", type=int, default=10,
                   help="early exit also at this many eval batches per val fold (the paper preset: about 10)")
    p.add_argument("--soup-reads", metavar="RESULTS", help=argparse.SUPPRESS)  # soup_reads_before's subprocess
    p.add_argument("--cache-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    if args.soup_reads:
        Path(args.json).write_text(json.dumps(soup_reads(args.soup_reads, args.soup_config, args.cache_bytes)))
        return
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    report = {"throughput": bench_model(args.model, device, precision)}
    print("## Throughput\n\n" + table([report["throughput"]]) + "\n")
    if args.compile:
        report["compile"] = bench_compile(args.model, device, precision)
        print("## torch.compile (finetune.compile)\n\n" + table([report["compile"]]) + "\n")
    if not args.skip_startup:
        report["startup_s"] = startup_seconds()
        print("## Per-job start-up (best of 3, seconds)\n\n" + table([report["startup_s"]]) + "\n")
    if args.demo_results:
        report["demo_rules"] = demo_breakdown(args.demo_results)
        print(f"## Per-rule time of {args.demo_results} (Snakemake benchmark files)\n\n" + table(report["demo_rules"]) + "\n")
    if args.soup_stage:
        report["soup_stage"] = soup_stage(args.soup_stage, args.soup_config, args.soup_before, args.soup_batches_per_fold)
        print(f"## Soup stage of {args.soup_stage} (counters: weight files read now and before {args.soup_before}, "
              "as run and with its budget cache off; val images evaluated in full and with early exit)\n\n"
              + table(report["soup_stage"]) + "\n")
    if not args.skip_scaling:
        report["scaling"] = dag_scaling()
        print("## DAG scaling (dry runs)\n\n" + table(report["scaling"]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
