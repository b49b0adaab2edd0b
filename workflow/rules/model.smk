if wf.builds_base_model(CFG):

    rule make_base_model:  # 'base', or 'base-seed<N>' per seed when the seeds vary the base model
        input:
            corpus=f"{RESULTS}/data/toy/pretrain.parquet",
        output:
            model=directory(f"{RESULTS}/models/{{base}}"),
            metrics=f"{RESULTS}/models/{{base}}.pretrain_metrics.jsonl",
        params:
            settings=lambda w: wf.tiny_settings(CFG, w.base),
            system_prompt=lambda w: CFG.root.data.system_prompt,
        threads: wf.stage_threads(CFG, "make_base_model")
        resources:
            **wf.stage_resources(CFG, "make_base_model"),
        log:
            f"{RESULTS}/logs/make_base_model/{{base}}.log",
        shell:
            "{LUFFY} make-base-model --settings {params.settings:q} --system-prompt {params.system_prompt:q}"
            " --corpus {input.corpus} --out-dir {output.model} --metrics {output.metrics}"
            " --threads {threads} --group {wildcards.base} --rule {rule} > {log} 2>&1"


if wf.prepares_base_model(CFG):

    rule prepare_base_model:
        input:
            template=wf.prepare_inputs(CFG),
        output:
            model=directory(f"{RESULTS}/models/base"),
        params:
            settings=lambda w: wf.prepare_settings(CFG),
        threads: wf.stage_threads(CFG, "prepare_base_model")
        resources:
            **wf.stage_resources(CFG, "prepare_base_model"),
        log:
            f"{RESULTS}/logs/prepare_base_model.log",
        shell:
            "{LUFFY} prepare-base-model --settings {params.settings:q} --out-dir {output.model}"
            " --group base --rule {rule} > {log} 2>&1"
