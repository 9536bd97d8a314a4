# models_from: models trained outside foldsoup, one import job per checkpoint of its CSV
# (foldsoup.config.models_from), instead of pretrain, lp and finetune. Each writes the files a
# fine-tune writes (foldsoup.steps.imports); the checkpoint is the job's input, so replacing one
# reruns its import and what follows it.
# Without models_from the rule matches no file (models are fine-tuned); with it, it makes every
# model (ruleorder) and the DAG has no pretrain, lp or finetune job.
from foldsoup.config.models_from import read_models_from

IMPORTED = read_models_from(config["models_from"], K) if config["models_from"] else None


ruleorder: import_model > finetune


rule import_model:
    input:
        data=rules.prepare.output,
        folds=rules.folds.output,
        checkpoint=lambda w: str(IMPORTED.checkpoint(w.hp, int(w.fold))),
    wildcard_constraints:
        hp="|".join(re.escape(hp) for hp in HPS) if IMPORTED else "(?!)",
    output:
        model=f"{R}/models/{{hp}}/fold{{fold}}/model.safetensors",
        predictions=f"{R}/models/{{hp}}/fold{{fold}}/predictions.safetensors",
        metrics=f"{R}/models/{{hp}}/fold{{fold}}/metrics.json",
    params:
        cfg=job_params("import_model"),
        runtime=runtime_params,
    log:
        f"{R}/logs/import_model/{{hp}}/fold{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/import_model/{{hp}}/fold{{fold}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("default"),
        mem_mb=mem_mb("default"),
    conda:
        ENV
    shell:
        "python -m foldsoup import-model --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --checkpoint {input.checkpoint:q} --hp {wildcards.hp} --fold {wildcards.fold} --out-dir $(dirname {output.model}) 2> {log}"
