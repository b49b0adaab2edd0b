rule report:
    input:
        **wf.report_stage_inputs(CFG),
    output:
        wf.report_outputs(CFG, report),
    params:
        settings=lambda w: wf.report_settings(CFG),
        suite_meta=lambda w: wf.suite_meta(CFG),
        models=MODELS,
        suites=SUITES,
        curves=[f"{e}={RESULTS}/train/{e}/metrics.jsonl" for e in EXPERIMENTS],
        teacher_traces=[f"{m}={wf.teacher_traces_file(CFG, m)}" for m in wf.teacher_traces_models(CFG)],
        out_dir=f"{RESULTS}/report",
    threads: wf.stage_threads(CFG, "report")
    resources:
        **wf.stage_resources(CFG, "report"),
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "{LUFFY} report --settings {params.settings:q} --suite-meta {params.suite_meta:q} --eval-dir {RESULTS}/eval --models {params.models}"
        " --suites {params.suites} --train-metrics {params.curves} --teacher-traces {params.teacher_traces} --out-dir {params.out_dir}"
        " --group report --rule {rule} > {log} 2>&1"
