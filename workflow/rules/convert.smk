rule convert:
    input:
        checkpoint=f"{RESULTS}/train/{{experiment}}/final",
    output:
        model=directory(f"{RESULTS}/models/{{experiment}}"),
    log:
        f"{RESULTS}/logs/convert/{{experiment}}.log",
    shell:
        "luffy convert --checkpoint {input.checkpoint} --out-dir {output.model}"
        " --group {wildcards.experiment} --rule {rule} > {log} 2>&1"
