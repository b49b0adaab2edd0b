rule evaluate:
    input:
        model=lambda w: wf.model_inputs(CFG, w.model),
        suites=list(wf.suite_files(CFG).values()),
    output:
        metrics=expand(f"{RESULTS}/eval/{{{{model}}}}/{{suite}}.json", suite=SUITES),
        samples=expand(f"{RESULTS}/eval/{{{{model}}}}/{{suite}}.parquet", suite=SUITES),
    params:
        settings=lambda w: wf.eval_settings(CFG),
        model=lambda w: wf.model_path(CFG, w.model),
        suites=wf.suite_args(CFG),
        out_dir=f"{RESULTS}/eval/{{model}}",
    threads: wf.stage_threads(CFG, "evaluate")
    resources:
        **wf.stage_resources(CFG, "evaluate"),
    log:
        f"{RESULTS}/logs/evaluate/{{model}}.log",
    shell:
        "{LUFFY} evaluate --settings {params.settings:q} --model {params.model:q} {params.suites}"
        " --out-dir {params.out_dir} --threads {threads} --gpus {resources.gpu}"
        " --group {wildcards.model} --rule {rule} > {log} 2>&1"
