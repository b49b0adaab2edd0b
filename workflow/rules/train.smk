rule train:
    input:
        data=f"{RESULTS}/data/train.parquet",
        base=wf.base_model_inputs(CFG),
    output:
        checkpoint=directory(f"{RESULTS}/train/{{experiment}}/final"),
        metrics=f"{RESULTS}/train/{{experiment}}/metrics.jsonl",
    params:
        settings=lambda w: wf.train_settings(CFG, w.experiment),
        base_model=wf.model_path(CFG, "base"),
        # Resumable checkpoints: deliberately not an output (Snakemake deletes outputs first).
        work_dir=f"{RESULTS}/train/{{experiment}}/work",
    threads: 2
    log:
        f"{RESULTS}/logs/train/{{experiment}}.log",
    shell:
        "luffy train --settings {params.settings:q} --data {input.data} --base-model {params.base_model:q}"
        " --out-dir {output.checkpoint} --metrics {output.metrics} --work-dir {params.work_dir}"
        " --threads {threads} --group {wildcards.experiment} --rule {rule} > {log} 2>&1"
