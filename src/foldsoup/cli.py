"""Command line: `python -m foldsoup <step> ...` (what the workflow rules run) and the user
commands `evaluate` and `predict` for any saved model or soup.

Imports happen inside each command so a job pays only for what it uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from foldsoup.errors import FoldsoupError


def _cfg(text: str) -> dict:
    return json.loads(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foldsoup", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def step(name: str, help: str, *args: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--config-json", type=_cfg, required="config" in args,
                       help="the configuration keys this step's result depends on, as JSON (foldsoup.config.job)")
        s.add_argument("--runtime-json", type=_cfg, default=None,
                       help="settings that never change the result (device, eval batch size, ...), merged into --config-json")
        for a in args:
            if a == "config":
                continue
            multi = a.endswith("*")
            s.add_argument(f"--{a.rstrip('*').replace('_', '-')}", nargs="+" if multi else None, required=True,
                           type=int if a in ("fold", "k") else str)
        return s

    step("prepare", "load the dataset and write the prepared file", "config", "out")
    step("folds", "stratified k-fold split of the pool", "config", "data", "out")
    step("pretrain", "the shared pretrained backbone", "config", "data", "out")
    step("lp", "linear probe of one fold", "config", "data", "folds", "backbone", "fold", "out")
    step("finetune", "fine-tune one (grid point, fold)", "config", "data", "folds", "backbone", "head", "hp", "fold",
         "out_dir", "resume_dir")
    step("models-table", "gather metrics into tables/models.csv", "metrics*", "out")
    step("uniform-subsets", "section 3.1 soups of one grid point", "config", "data", "folds", "hp", "models*", "metrics*", "out")
    step("greedy-fold", "greedy and uniform soup of one fold", "config", "data", "folds", "fold", "models*", "metrics*",
         "out_greedy", "out_uniform")
    step("uniform-all", "uniform soup of all models", "config", "data", "folds", "models*", "metrics*", "out")
    step("greedy-all", "greedy soup of all models (MinAcc)", "config", "data", "folds", "models*", "metrics*", "out")
    step("greedy-holdout", "greedy soup of all models scored on the outer holdout", "config", "data", "folds", "models*",
         "metrics*", "out")
    step("gsgs", "greedy soup of the per-fold greedy soups", "config", "data", "folds", "fold_soups*", "out")
    step("methods", "tables/methods.csv, the selected soups, ensembles and intervals", "config", "data", "folds",
         "models_csv", "model_dir", "soups_dir", "out")
    step("ship", "results/ship/: a copy of the soups.ship method's weights and ship.json", "config", "weights", "out",
         "out_record")
    step("reliability", "tables/uniform_subsets.csv and tables/reliability.csv", "subsets*", "models_csv", "out_subsets", "out")
    step("figures", "figures 2-4 and the methods figure", "models_csv", "subsets", "reliability", "methods", "out*")
    summary = step("summary", "summary.md: tables 1-4 beside the paper", "config", "models_csv", "subsets", "reliability",
                   "methods", "out")
    summary.add_argument("--budget", nargs="*", default=[], help="tables/budget.csv, for the summary's Budget section")
    summary.add_argument("--ship", help="ship/ship.json, for the statement at the summary's top")
    step("budget", "budget cells of one fold count: methods on subsets of grid points and folds", "config", "data", "folds",
         "model_dir", "n_folds", "out")
    step("budget-table", "tables/budget.csv and figures/budget.png", "parts*", "out_table", "out_figure")

    ev = sub.add_parser("evaluate", help="accuracy of a saved model or soup on a prepared dataset")
    ev.add_argument("model", help="a .safetensors file written by foldsoup")
    ev.add_argument("--data", required=True, help="results/prepared/dataset.safetensors")
    ev.add_argument("--folds", help="results/folds.csv, to report each fold's val accuracy too")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    pr = sub.add_parser("predict", help="class predictions of a saved model or soup for images")
    pr.add_argument("model")
    pr.add_argument("images", nargs="+", help="image files (PNG/JPEG), read as `prepare` read the training images")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from foldsoup import steps as pl
    from foldsoup.config.job import merge

    c = args.command
    cfg = merge(getattr(args, "config_json", None), getattr(args, "runtime_json", None))
    if cfg:  # the job's settings go to its log, not to the console (the profiles print no shell commands)
        pl.log(f"{c}: settings {json.dumps(cfg, sort_keys=True, separators=(',', ':'))}")
    try:
        if c == "prepare":
            pl.prepare(cfg, args.out)
        elif c == "folds":
            pl.folds(cfg, args.data, args.out)
        elif c == "pretrain":
            pl.pretrain(cfg, args.data, args.out)
        elif c == "lp":
            pl.linear_probe(cfg, args.data, args.folds, args.backbone, args.fold, args.out)
        elif c == "finetune":
            pl.finetune(cfg, args.data, args.folds, args.backbone, args.head, args.hp, args.fold, args.out_dir, args.resume_dir)
        elif c == "models-table":
            pl.models_table(args.metrics, args.out)
        elif c == "uniform-subsets":
            pl.uniform_subsets(cfg, args.data, args.folds, args.hp, args.models, args.metrics, args.out)
        elif c == "greedy-fold":
            pl.greedy_per_fold(cfg, args.data, args.folds, args.fold, args.models, args.metrics, args.out_greedy, args.out_uniform)
        elif c == "uniform-all":
            pl.uniform_all(cfg, args.data, args.folds, args.models, args.metrics, args.out)
        elif c == "greedy-all":
            pl.greedy_all(cfg, args.data, args.folds, args.models, args.metrics, args.out)
        elif c == "greedy-holdout":
            pl.greedy_all(cfg, args.data, args.folds, args.models, args.metrics, args.out, on_holdout=True)
        elif c == "gsgs":
            pl.gsgs(cfg, args.data, args.folds, args.fold_soups, args.out)
        elif c == "methods":
            pl.methods(cfg, args.data, args.folds, args.models_csv, args.model_dir, args.soups_dir, args.out)
        elif c == "ship":
            pl.ship(cfg, args.weights, args.out, args.out_record)
        elif c == "reliability":
            pl.reliability(args.subsets, args.models_csv, args.out_subsets, args.out)
        elif c == "figures":
            pl.figures(args.models_csv, args.subsets, args.reliability, args.methods, args.out)
        elif c == "summary":
            pl.summary(cfg, args.models_csv, args.subsets, args.reliability, args.methods, args.out,
                       budget_csv=args.budget[0] if args.budget else None, ship_json=args.ship)
        elif c == "budget":
            from foldsoup.steps import budget

            budget(cfg, args.data, args.folds, args.model_dir, int(args.n_folds), args.out)
        elif c == "budget-table":
            from foldsoup.steps import budget_table

            budget_table(args.parts, args.out_table, args.out_figure)
        elif c == "evaluate":
            from foldsoup.usage import evaluate

            print(json.dumps(evaluate(args.model, args.data, args.folds, args.device), indent=2))
        elif c == "predict":
            from foldsoup.usage import predict

            for path, label, prob in predict(args.model, args.images, args.device):
                print(f"{path}\t{label}\t{prob:.4f}")
    except FoldsoupError as exc:
        # Raised on purpose, with a message written for the user; no traceback needed.
        print(f"foldsoup {c}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is None:
            return _bug(c, exc)
        # A path the loaders do not check (a step's output or table), named by the OS.
        print(f"foldsoup {c}: error: {os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if is_out_of_memory(exc):
            traceback.print_exc()
            print(f"foldsoup {c}: error: {OUT_OF_MEMORY}", file=sys.stderr)
            return 1
        return _bug(c, exc)
    return 0


OUT_OF_MEMORY = ("CUDA out of memory (the traceback above says where); lower finetune.batch_size (training), "
                 "finetune.eval_batch_size (evaluation and soups) or lp.batch_size (feature extraction), or run the "
                 "job on a GPU with more memory (resources.*: what a cluster job asks for)")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the plain RuntimeError older torch and cuBLAS/cuDNN give."""
    torch = sys.modules.get("torch")  # not imported: no CUDA ran, so no CUDA OOM
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", ())
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _bug(c: str, exc: BaseException) -> int:
    """An exception nobody raised on purpose, most likely a defect: its traceback goes to stderr
    (the job's log), and the last line says so rather than passing it off as bad input."""
    traceback.print_exc()
    print(f"foldsoup {c}: unexpected {type(exc).__name__}: {exc} (not an error foldsoup reports on purpose; "
          f"unless it is the machine's, e.g. a full disk, please report it with the traceback above)", file=sys.stderr)
    return 1


def os_error(exc: OSError) -> str:
    """One line naming the path and what to do, for the errors a wrong path gives."""
    path = repr(exc.filename) if exc.filename else "a path"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder; give the path of a file"
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return f"{path}: a file stands where a folder is needed ({exc.strerror}); move it away or choose another path"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied; check its owner and mode"
    return f"{path}: {exc.strerror or exc}"
