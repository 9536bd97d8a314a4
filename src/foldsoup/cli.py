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


# Steps that take no configuration but score with soups.metric: it comes as --metric.
METRIC_OPTION_STEPS = ("reliability", "figures")


def _cfg(text: str) -> dict:
    return json.loads(text)


def build_parser() -> argparse.ArgumentParser:
    from foldsoup.soups.select import METRICS
    from foldsoup.steps import INTEGER_OPTIONS, STEPS

    p = argparse.ArgumentParser(prog="foldsoup", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, step in STEPS.items():
        s = sub.add_parser(name, help=step.help)
        s.add_argument("--config-json", type=_cfg, required=step.takes_config,
                       help="the configuration keys this step's result depends on, as JSON (foldsoup.config.job)")
        s.add_argument("--runtime-json", type=_cfg, default=None,
                       help="settings that never change the result (device, eval batch size, ...), merged into --config-json")
        for a in step.args:
            if a != "config":
                s.add_argument(_option(a), dest=a.rstrip("*"), nargs="+" if a.endswith("*") else None, required=True,
                               type=int if a in INTEGER_OPTIONS else str)
        for option, keyword in step.optional.items():
            s.add_argument(_option(option), nargs="?", default=None, help=f"optional: the step's {keyword}")
        if name in METRIC_OPTION_STEPS:
            s.add_argument("--metric", choices=list(METRICS), default="accuracy",
                           help="soups.metric: the score the tables and figures read (default: accuracy)")

    ev = sub.add_parser("evaluate", help="accuracy of a saved model or soup on a prepared dataset")
    ev.add_argument("model", help="a .safetensors file written by foldsoup")
    ev.add_argument("--data", required=True, help="results/prepared/dataset.safetensors")
    ev.add_argument("--folds", help="results/folds.csv, to report each fold's val accuracy too")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    pr = sub.add_parser("predict", help="class predictions of a saved model or soup for images")
    pr.add_argument("model")
    pr.add_argument("images", nargs="+", help="image files (PNG/JPEG), read as `prepare` read the training images")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--out", help="write a CSV instead of printing: path, predicted_class and p_<class> (the probability "
                                  "of each class, in the model's class order) per image")
    return p


def _option(arg: str) -> str:
    return f"--{arg.rstrip('*').replace('_', '-')}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from foldsoup import steps as pl
    from foldsoup.config.job import merge

    c = args.command
    cfg = merge(getattr(args, "config_json", None), getattr(args, "runtime_json", None))
    if cfg:  # the job's settings go to its log, not to the console (the profiles print no shell commands)
        pl.log(f"{c}: settings {json.dumps(cfg, sort_keys=True, separators=(',', ':'))}")
    try:
        if c in pl.STEPS:
            step = pl.STEPS[c]
            values = [cfg if a == "config" else getattr(args, a.rstrip("*")) for a in step.args]
            extra = {"metric": args.metric} if c in METRIC_OPTION_STEPS else {}
            step.run(*values, **{keyword: getattr(args, option) for option, keyword in step.optional.items()}, **extra)
        elif c == "evaluate":
            from foldsoup.usage import evaluate

            print(json.dumps(evaluate(args.model, args.data, args.folds, args.device), indent=2))
        elif c == "predict":
            from foldsoup.usage import predict, write_predictions

            if args.out:
                print(f"{args.out}: predictions of {write_predictions(args.model, args.images, args.out, args.device)} images")
            else:
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
