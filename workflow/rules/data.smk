rule make_toy_traces:
    output:
        traces=f"{RESULTS}/data/toy/raw_traces.parquet",
        pretrain=f"{RESULTS}/data/toy/pretrain.parquet",
        suite_id=f"{RESULTS}/data/toy/suite_id.parquet",
        suite_ood=f"{RESULTS}/data/toy/suite_ood.parquet",
    params:
        settings=lambda w: wf.toy_settings(CFG),
        out_dir=f"{RESULTS}/data/toy",
    threads: wf.stage_threads(CFG, "make_toy_traces")
    resources:
        **wf.stage_resources(CFG, "make_toy_traces"),
    log:
        f"{RESULTS}/logs/make_toy_traces.log",
    shell:
        "{LUFFY} make-toy-traces --settings {params.settings:q} --out-dir {params.out_dir}"
        " --group data --rule {rule} > {log} 2>&1"


rule prepare_traces:
    input:
        traces=wf.trace_inputs(CFG),
    output:
        train=f"{RESULTS}/data/train.parquet",
        valid=f"{RESULTS}/data/valid.parquet",
        report=f"{RESULTS}/data/prepare_report.json",
    params:
        settings=lambda w: wf.filter_settings(CFG),
        traces=wf.trace_file(CFG),
        tokenizer=wf.tokenizer(CFG),
    threads: wf.stage_threads(CFG, "prepare_traces")
    resources:
        **wf.stage_resources(CFG, "prepare_traces"),
    log:
        f"{RESULTS}/logs/prepare_traces.log",
    shell:
        "{LUFFY} prepare-traces --settings {params.settings:q} --traces {params.traces:q}"
        " --tokenizer {params.tokenizer:q} --out {output.train} --validation-out {output.valid}"
        " --report {output.report}"
        " --group data --rule {rule} > {log} 2>&1"


rule prepare_benchmark:
    input:
        local=lambda w: wf.benchmark_inputs(CFG, w.suite),
    output:
        suite=f"{RESULTS}/data/benchmarks/{{suite}}.parquet",
    params:
        settings=lambda w: wf.benchmark_settings(CFG, w.suite),
    threads: wf.stage_threads(CFG, "prepare_benchmark")
    resources:
        **wf.stage_resources(CFG, "prepare_benchmark"),
    log:
        f"{RESULTS}/logs/prepare_benchmark/{{suite}}.log",
    shell:
        "{LUFFY} prepare-benchmark --settings {params.settings:q} --name {wildcards.suite} --out {output.suite}"
        " --group data --rule {rule} > {log} 2>&1"
