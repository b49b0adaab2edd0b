rule evaluate:
    input:
        model=lambda w: wf.model_inputs(CFG, w.model),
        suites=list(wf.suite_files(CFG).values()),
    output:
        metrics=expand(f"{RESULTS}/eval/{{{{model}}}}/{{suite}}.json", suite=SUITES),
        samples=expand(f"{RESULTS}/eval/{{{{model}}}}/{{suite}}.parquet", suite=SUITES),
    params:
        settings=lambda w: wf.eval_settings(CFG, w.model),
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
        " --out-dir {params.out_dir} --threads {threads} --gpus {resources.job_gpus}"
        " --group {wildcards.model} --rule {rule} > {log} 2>&1"


if CFG.root.report.teacher_traces > 0:

    rule teacher_traces:  # how probable the teacher's tokens are under each evaluated model
        input:
            model=lambda w: wf.model_inputs(CFG, w.model),
            data=f"{RESULTS}/data/train.parquet",
        output:
            f"{RESULTS}/eval/{{model}}/teacher_traces.json",
        params:
            model=lambda w: wf.model_path(CFG, w.model),
            traces=CFG.root.report.teacher_traces,
        threads: wf.stage_threads(CFG, "teacher_traces")
        resources:
            **wf.stage_resources(CFG, "teacher_traces"),
        log:
            f"{RESULTS}/logs/teacher_traces/{{model}}.log",
        shell:
            "{LUFFY} teacher-traces --model {params.model:q} --data {input.data} --traces {params.traces}"
            " --out {output} --threads {threads} --group {wildcards.model} --rule {rule} > {log} 2>&1"
