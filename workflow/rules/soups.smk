localrules:
    models_table,
    methods,
    ship,


rule models_table:
    input:
        model_paths(name="metrics.json"),
    output:
        report(f"{R}/tables/models.csv", caption="../report/models.rst", category="Tables"),
    log:
        f"{R}/logs/models_table.log",
    conda:
        ENV
    shell:
        "python -m foldsoup models-table --metrics {input} --out {output} 2> {log}"


# Common inputs of the soup jobs: the data, the split and every model's weights and metrics.
SOUP_INPUTS = dict(
    data=rules.prepare.output,
    folds=rules.folds.output,
)


rule uniform_subsets:
    input:
        **SOUP_INPUTS,
        models=lambda w: model_paths(hps=[w.hp]),
        metrics=lambda w: model_paths(hps=[w.hp], name="metrics.json"),
    output:
        f"{R}/analysis/uniform_subsets/{{hp}}.csv",
    params:
        cfg=job_params("uniform_subsets"),
        runtime=runtime_params,
    log:
        f"{R}/logs/uniform_subsets/{{hp}}.log",
    benchmark:
        f"{R}/benchmarks/uniform_subsets/{{hp}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("soups"),
        mem_mb=mem_mb("soups"),
    conda:
        ENV
    shell:
        "python -m foldsoup uniform-subsets --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --hp {wildcards.hp} --models {input.models} --metrics {input.metrics} --out {output} 2> {log}"


rule greedy_fold:
    input:
        **SOUP_INPUTS,
        models=lambda w: model_paths(folds=[int(w.fold)]),
        metrics=lambda w: model_paths(folds=[int(w.fold)], name="metrics.json"),
    output:
        greedy=f"{R}/soups/greedy_fold{{fold}}.safetensors",
        greedy_predictions=f"{R}/soups/greedy_fold{{fold}}.predictions.safetensors",
        greedy_json=f"{R}/soups/greedy_fold{{fold}}.json",
        uniform=f"{R}/soups/uniform_fold{{fold}}.safetensors",
        uniform_predictions=f"{R}/soups/uniform_fold{{fold}}.predictions.safetensors",
        uniform_json=f"{R}/soups/uniform_fold{{fold}}.json",
    params:
        cfg=job_params("greedy_fold"),
        runtime=runtime_params,
    log:
        f"{R}/logs/greedy_fold/fold{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/greedy_fold/fold{{fold}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("soups"),
        mem_mb=mem_mb("soups"),
    conda:
        ENV
    shell:
        "python -m foldsoup greedy-fold --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --fold {wildcards.fold} --models {input.models} --metrics {input.metrics}"
        " --out-greedy {output.greedy} --out-uniform {output.uniform} 2> {log}"


rule soup_all:
    input:
        **SOUP_INPUTS,
        models=model_paths(),
        metrics=model_paths(name="metrics.json"),
    output:
        weights=f"{R}/soups/{{method}}.safetensors",
        predictions=f"{R}/soups/{{method}}.predictions.safetensors",
        record=f"{R}/soups/{{method}}.json",
    wildcard_constraints:
        method="|".join(SOUPS_ALL),
    params:
        cfg=job_params("soup_all"),
        runtime=runtime_params,
        step=lambda w: METHODS[w.method].step,
    log:
        f"{R}/logs/{{method}}.log",
    benchmark:
        f"{R}/benchmarks/{{method}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("soups"),
        mem_mb=mem_mb("soups"),
    conda:
        ENV
    shell:
        "python -m foldsoup {params.step} --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --models {input.models} --metrics {input.metrics} --out {output.weights} 2> {log}"


rule gsgs:
    input:
        **SOUP_INPUTS,
        fold_soups=expand(f"{R}/soups/greedy_fold{{fold}}.safetensors", fold=FOLDS),
        records=expand(f"{R}/soups/greedy_fold{{fold}}.json", fold=FOLDS),
    output:
        weights=f"{R}/soups/gsgs.safetensors",
        predictions=f"{R}/soups/gsgs.predictions.safetensors",
        record=f"{R}/soups/gsgs.json",
    params:
        cfg=job_params("gsgs"),
        runtime=runtime_params,
    log:
        f"{R}/logs/gsgs.log",
    benchmark:
        f"{R}/benchmarks/gsgs.tsv"
    resources:
        gpu=1,
        runtime=runtime("soups"),
        mem_mb=mem_mb("soups"),
    conda:
        ENV
    shell:
        "python -m foldsoup gsgs --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --fold-soups {input.fold_soups} --out {output.weights} 2> {log}"


rule methods:
    input:
        data=rules.prepare.output,
        folds=rules.folds.output,
        models=rules.models_table.output,
        # What the job reads or links to: the models' weights and logits (best_on_val and
        # best_on_holdout are links to a model), every soup's record and test logits, and the
        # per-fold soups' weights (bgss and best_uniform_per_split are links to one of them).
        weights=model_paths(),
        predictions=model_paths(name="predictions.safetensors"),
        soups=expand(f"{R}/soups/{{method}}.json", method=SOUPS_BEFORE_METHODS),
        soup_predictions=expand(f"{R}/soups/{{method}}.predictions.safetensors", method=SOUPS_BEFORE_METHODS),
        per_fold=expand(f"{R}/soups/{{kind}}_fold{{fold}}.json", kind=["greedy", "uniform"], fold=FOLDS),
        per_fold_weights=expand(f"{R}/soups/{{kind}}_fold{{fold}}{{ext}}", kind=["greedy", "uniform"], fold=FOLDS,
                                ext=[".safetensors", ".predictions.safetensors"]),
    output:
        table=report(f"{R}/tables/methods.csv", caption="../report/methods.rst", category="Tables"),
        per_class=report(f"{R}/tables/per_class.csv", caption="../report/per_class.rst", category="Tables"),
        selected=expand(
            f"{R}/soups/{{method}}{{ext}}",
            method=SELECTIONS,
            ext=[".safetensors", ".predictions.safetensors", ".json"],
        ),
    params:
        cfg=job_params("methods"),
        model_dir=lambda w: f"{R}/models",
        soups_dir=lambda w, input: os.path.dirname(input.soups[0]),
    log:
        f"{R}/logs/methods.log",
    conda:
        ENV
    shell:
        "python -m foldsoup methods --config-json {params.cfg:q} --data {input.data} --folds {input.folds}"
        " --models-csv {input.models} --model-dir {params.model_dir} --soups-dir {params.soups_dir}"
        " --out {output.table} --out-per-class {output.per_class} 2> {log}"


# The model the run ships, named before the run (soups.ship): a copy at a stable path and what
# it is worth. Its input is the method's weights and record, whichever rule makes them.
rule ship:
    input:
        weights=f"{R}/soups/{config['soups']['ship']}.safetensors",
        record=f"{R}/soups/{config['soups']['ship']}.json",
    output:
        model=f"{R}/ship/model.safetensors",
        record=report(f"{R}/ship/ship.json", caption="../report/ship.rst", category="Summary"),
    params:
        cfg=job_params("ship"),
    log:
        f"{R}/logs/ship.log",
    conda:
        ENV
    shell:
        "python -m foldsoup ship --config-json {params.cfg:q} --weights {input.weights} --out {output.model}"
        " --out-record {output.record} 2> {log}"
