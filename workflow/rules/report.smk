localrules:
    reliability,
    figures,
    summary,


rule reliability:
    input:
        subsets=expand(f"{R}/analysis/uniform_subsets/{{hp}}.csv", hp=HPS),
        models=rules.models_table.output,
    output:
        subsets=report(f"{R}/tables/uniform_subsets.csv", caption="../report/uniform_subsets.rst", category="Tables"),
        reliability=report(f"{R}/tables/reliability.csv", caption="../report/reliability.rst", category="Tables"),
    params:
        metric=config["soups"]["metric"],
    log:
        f"{R}/logs/reliability.log",
    conda:
        ENV
    shell:
        "python -m foldsoup reliability --subsets {input.subsets} --models-csv {input.models}"
        " --out-subsets {output.subsets} --out {output.reliability} --metric {params.metric} 2> {log}"


rule figures:
    input:
        models=rules.models_table.output,
        subsets=rules.reliability.output.subsets,
        reliability=rules.reliability.output.reliability,
        methods=rules.methods.output.table,
        per_class=rules.methods.output.per_class,
    output:
        report(f"{R}/figures/fig2_models_val_test.png", caption="../report/figure2.rst", category="Figures"),
        report(f"{R}/figures/fig3_uniform_soups_val_test.png", caption="../report/figure3.rst", category="Figures"),
        report(f"{R}/figures/fig4_uniform_soups_over_threshold.png", caption="../report/figure4.rst", category="Figures"),
        report(f"{R}/figures/methods_test_accuracy.png", caption="../report/methods_figure.rst", category="Figures"),
        report(f"{R}/figures/validation_signals.png", caption="../report/validation_signals.rst", category="Figures"),
        report(f"{R}/figures/confusion.png", caption="../report/confusion.rst", category="Figures"),
    params:
        metric=config["soups"]["metric"],
    log:
        f"{R}/logs/figures.log",
    conda:
        ENV
    shell:
        "python -m foldsoup figures --models-csv {input.models} --subsets {input.subsets} --reliability {input.reliability}"
        " --methods {input.methods} --per-class {input.per_class} --metric {params.metric} --out {output} 2> {log}"


rule summary:
    input:
        models=rules.models_table.output,
        subsets=rules.reliability.output.subsets,
        reliability=rules.reliability.output.reliability,
        methods=rules.methods.output.table,
        per_class=rules.methods.output.per_class,
        folds=rules.folds.output,
        budget=rules.budget_table.output.table if config["budget"]["enabled"] else [],
        ship=rules.ship.output.record,
    output:
        report(f"{R}/summary.md", caption="../report/summary.rst", category="Summary"),
    params:
        cfg=job_params("summary"),
    log:
        f"{R}/logs/summary.log",
    conda:
        ENV
    shell:
        "python -m foldsoup summary --config-json {params.cfg:q} --models-csv {input.models} --subsets {input.subsets}"
        " --reliability {input.reliability} --methods {input.methods} --budget {input.budget} --ship {input.ship}"
        " --per-class {input.per_class} --folds {input.folds}"
        " --out {output} 2> {log}"
