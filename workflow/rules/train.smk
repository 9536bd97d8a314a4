rule pretrain:
    input:
        data=rules.prepare.output,
        checkpoint=pretrained_checkpoint(),
    output:
        f"{R}/pretrained/backbone.safetensors",
    params:
        cfg=job_params("pretrain"),
        runtime=runtime_params,
    log:
        f"{R}/logs/pretrain.log",
    benchmark:
        f"{R}/benchmarks/pretrain.tsv"
    resources:
        gpu=1,
        runtime=runtime("default"),
        mem_mb=mem_mb("default"),
    conda:
        ENV
    shell:
        "python -m foldsoup pretrain --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --out {output} 2> {log}"


rule lp:
    input:
        data=rules.prepare.output,
        folds=rules.folds.output,
        backbone=rules.pretrain.output,
    output:
        f"{R}/lp/fold{{fold}}/head.safetensors",
    params:
        cfg=job_params("lp"),
        runtime=runtime_params,
    log:
        f"{R}/logs/lp/fold{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/lp/fold{{fold}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("default"),
        mem_mb=mem_mb("default"),
    conda:
        ENV
    shell:
        "python -m foldsoup lp --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --backbone {input.backbone} --fold {wildcards.fold} --out {output} 2> {log}"


rule finetune:
    input:
        data=rules.prepare.output,
        folds=rules.folds.output,
        backbone=rules.pretrain.output,
        head=rules.lp.output,
    output:
        model=f"{R}/models/{{hp}}/fold{{fold}}/model.safetensors",
        predictions=f"{R}/models/{{hp}}/fold{{fold}}/predictions.safetensors",
        metrics=f"{R}/models/{{hp}}/fold{{fold}}/metrics.json",
    params:
        cfg=job_params("finetune"),
        runtime=runtime_params,
        # Resume state lives outside the outputs: Snakemake deletes a failed job's outputs.
        resume=f"{R}/.resume/{{hp}}/fold{{fold}}",
    log:
        f"{R}/logs/finetune/{{hp}}/fold{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{hp}}/fold{{fold}}.tsv"
    resources:
        gpu=1,
        runtime=runtime("finetune"),
        mem_mb=mem_mb("finetune"),
    conda:
        ENV
    shell:
        "python -m foldsoup finetune --config-json {params.cfg:q} --runtime-json {params.runtime:q} --data {input.data} --folds {input.folds}"
        " --backbone {input.backbone} --head {input.head} --hp {wildcards.hp} --fold {wildcards.fold}"
        " --out-dir $(dirname {output.model}) --resume-dir {params.resume} 2> {log}"
