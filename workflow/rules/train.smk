rule train:
    input:
        data=wf.train_inputs(CFG),
        start=lambda w: wf.start_model_inputs(CFG, w.experiment),
    output:
        checkpoint=directory(f"{RESULTS}/train/{{experiment}}/final"),
        metrics=f"{RESULTS}/train/{{experiment}}/metrics.jsonl",
    params:
        settings=lambda w: wf.train_settings(CFG, w.experiment),
        start_model=lambda w: wf.start_model(CFG, w.experiment),
        # Resumable checkpoints: deliberately not an output (Snakemake deletes outputs first).
        work_dir=f"{RESULTS}/train/{{experiment}}/work",
    threads: wf.train_threads(CFG)
    resources:
        **wf.train_resources(CFG),
    log:
        f"{RESULTS}/logs/train/{{experiment}}.log",
    shell:
        "{LUFFY} train --settings {params.settings:q} --data {input.data[0]} --base-model {params.start_model:q}"
        " --out-dir {output.checkpoint} --metrics {output.metrics} --work-dir {params.work_dir}"
        " --threads {threads} --nodes {resources.nodes} --gpus {resources.job_gpus} --runtime {resources.runtime}"
        " --chain {resources.chain}"
        " --log {params.work_dir}/train.log"  # every attempt and part of a chain (Snakemake clears {log})
        " --group {wildcards.experiment} --rule {rule} > {log} 2>&1"
