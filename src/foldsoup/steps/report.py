"""Steps `reliability`, `figures` and `summary`: the paper's tables, figures and summary.md from
the gathered CSV files (no torch)."""

from __future__ import annotations

from foldsoup.steps.context import log


def reliability(subset_paths: list[str], models_csv: str, out_subsets: str, out: str,
                metric: str = "accuracy") -> None:
    """tables/uniform_subsets.csv (every metric's columns, as written) and tables/reliability.csv
    (Tables 1-2 under `metric`, soups.metric)."""
    import pandas as pd

    from foldsoup.analysis.reliability import reliability_table
    from foldsoup.storage.weights import atomic_write_text

    subsets = pd.concat([pd.read_csv(p, dtype={"folds": str}) for p in subset_paths], ignore_index=True)
    models = pd.read_csv(models_csv)
    table = reliability_table(subsets, models, metric=metric)
    atomic_write_text(out_subsets, subsets.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"{len(subsets)} uniform soups\n" + table.to_string(index=False))


def figures(models_csv: str, subsets_csv: str, reliability_csv: str, methods_csv: str, outs: list[str],
            per_class_csv: str | None = None, metric: str = "accuracy") -> None:
    """Figures 2-4, the methods figure, the validation signals and, with `per_class_csv`
    (tables/per_class.csv), the confusion matrices: `outs` in that order. All but the confusion
    matrices plot `metric` (soups.metric)."""
    import pandas as pd

    from foldsoup.report.plots import (
        plot_confusion,
        plot_methods,
        plot_models_val_test,
        plot_subsets_val_test,
        plot_validation_signals,
    )

    models, subsets = pd.read_csv(models_csv), pd.read_csv(subsets_csv, dtype={"folds": str})
    threshold = float(pd.read_csv(reliability_csv).threshold.iloc[0])
    fig2, fig3, fig4, fig_methods, fig_signals, *fig_confusion = outs
    if bool(fig_confusion) != bool(per_class_csv):
        raise ValueError("figures: the confusion figure needs --per-class and a sixth --out, or neither")
    plot_models_val_test(models, fig2, metric=metric)
    plot_subsets_val_test(subsets, fig3, metric=metric)
    plot_subsets_val_test(subsets, fig4, threshold=threshold, metric=metric)
    plot_methods(pd.read_csv(methods_csv), models, fig_methods, metric=metric)
    plot_validation_signals(subsets, fig_signals, metric=metric)
    if per_class_csv:
        plot_confusion(pd.read_csv(per_class_csv, dtype={"class": str}), fig_confusion[0])


def summary(cfg: dict, models_csv: str, subsets_csv: str, reliability_csv: str, methods_csv: str, out: str,
            budget_csv: str | None = None, ship_json: str | None = None, per_class_csv: str | None = None,
            folds_csv: str | None = None) -> None:
    """summary.md; `ship_json` (ship/ship.json) gives the statement at its top: the model to ship."""
    import json
    from pathlib import Path

    import pandas as pd

    from foldsoup.analysis.reliability import subsets_sampled
    from foldsoup.report.summary import write_summary

    models = pd.read_csv(models_csv)
    run_info = {
        "dataset": cfg["data"]["name"],
        "model": cfg["model"]["name"] if cfg["model"]["name"] not in ("open_clip", "timm")
        else f"{cfg['model']['name']} {cfg['model']['arch']} ({cfg['model']['pretrained'] or 'random weights'})",
        "k": cfg["folds"]["k"],
        "grid_points": models.hp.nunique(),
        "models": len(models),
        "sampled": subsets_sampled(cfg["folds"]["k"], cfg["analysis"]["max_subsets_per_n"]),
        "diverged": models.loc[models.diverged.astype(bool), "hp"].tolist() if "diverged" in models else [],
        "metric": cfg.get("soups", {}).get("metric", "accuracy"),
    }
    if cfg.get("models_from"):  # trained outside foldsoup: imported, not fine-tuned here
        run_info["model"] += f"; {len(models)} checkpoints imported from models_from {cfg['models_from']} (no fine-tune)"
        run_info["imported"] = True
    write_summary(out, pd.read_csv(reliability_csv), pd.read_csv(methods_csv), models,
                  pd.read_csv(subsets_csv, dtype={"folds": str}), run_info,
                  budget=pd.read_csv(budget_csv, dtype={"grid": str, "folds": str}) if budget_csv else None,
                  ship=json.loads(Path(ship_json).read_text()) if ship_json else None,
                  per_class=pd.read_csv(per_class_csv, dtype={"class": str}) if per_class_csv else None,
                  folds=pd.read_csv(folds_csv, dtype={"group": str}) if folds_csv else None)
