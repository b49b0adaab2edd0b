rule convert:
    input:
        checkpoint=f"{RESULTS}/train/{{experiment}}/final",
    output:
        model=directory(f"{RESULTS}/models/{{experiment}}"),
    threads: wf.stage_threads(CFG, "convert")
    resources:
        **wf.stage_resources(CFG, "convert"),
    log:
        f"{RESULTS}/logs/convert/{{experiment}}.log",
    shell:
        "{LUFFY} convert --checkpoint {input.checkpoint} --out-dir {output.model}"
        " --group {wildcards.experiment} --rule {rule} > {log} 2>&1"
