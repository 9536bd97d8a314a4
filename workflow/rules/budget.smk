# Budget: more grid points or more folds? Methods on subsets of the models already trained (no
# retraining), one job per fold count f; see foldsoup.analysis.budget and the `budget` config section.
from foldsoup.analysis.budget import fold_counts


localrules:
    budget_table,


BUDGET_FOLDS = fold_counts(K, config["budget"]["fold_counts"])


rule budget:
    input:
        **SOUP_INPUTS,
        models=model_paths(),
        metrics=model_paths(name="metrics.json"),
        predictions=model_paths(name="predictions.safetensors"),
    output:
        f"{R}/analysis/budget/f{{n_folds}}.csv",
    wildcard_constraints:
        n_folds=r"\d+",
    params:
        cfg=job_params("budget"),
        runtime=runtime_params,
        model_dir=lambda w: f"{R}/models",
    log:
        f"{R}/logs/budget/f{{n_folds}}.log",
    benchmark:
        f"{R}/benchmarks/budget/f{{n_folds}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("soups"),
        mem_mb=mem_mb("soups"),
    conda:
        ENV
    shell:
        "python -m foldsoup budget --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --model-dir {params.model_dir} --n-folds {wildcards.n_folds}"
        " --out {output} 2> {log}"


rule budget_table:
    input:
        expand(f"{R}/analysis/budget/f{{n_folds}}.csv", n_folds=BUDGET_FOLDS),
    output:
        table=report(f"{R}/tables/budget.csv", caption="../report/budget_table.rst", category="Tables"),
        figure=report(f"{R}/figures/budget.png", caption="../report/budget.rst", category="Figures"),
    log:
        f"{R}/logs/budget_table.log",
    conda:
        ENV
    shell:
        "python -m foldsoup budget-table --parts {input} --out-table {output.table} --out-figure {output.figure} 2> {log}"
