rule make_base_model:
    input:
        corpus=f"{RESULTS}/data/toy/pretrain.parquet",
    output:
        model=directory(f"{RESULTS}/models/base"),
        metrics=f"{RESULTS}/models/base.pretrain_metrics.jsonl",
    params:
        settings=wf.tiny_settings(CFG),
        system_prompt=CFG.root.data.system_prompt,
    threads: 2
    log:
        f"{RESULTS}/logs/make_base_model.log",
    shell:
        "luffy make-base-model --settings {params.settings:q} --system-prompt {params.system_prompt:q}"
        " --corpus {input.corpus} --out-dir {output.model} --metrics {output.metrics}"
        " --threads {threads} --group base --rule {rule} > {log} 2>&1"
