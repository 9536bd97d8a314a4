localrules:
    prepare,
    folds,


rule prepare:
    input:
        # The dataset's files and folders as they exist now: replacing the data reruns `prepare`.
        source_paths(config["data"]),
    output:
        f"{R}/prepared/dataset.safetensors",
    params:
        cfg=job_params("prepare"),
        runtime=runtime_params,
    log:
        f"{R}/logs/prepare.log",
    conda:
        ENV
    shell:
        "python -m foldsoup prepare --config-json {params.cfg:q} --runtime-json {params.runtime:q} --out {output} 2> {log}"


rule folds:
    input:
        rules.prepare.output,
    output:
        f"{R}/folds.csv",
    params:
        cfg=job_params("folds"),
    log:
        f"{R}/logs/folds.log",
    conda:
        ENV
    shell:
        "python -m foldsoup folds --config-json {params.cfg:q} --data {input} --out {output} 2> {log}"
