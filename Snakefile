# LUFFY: Learning to Reason under Off-Policy Guidance -- the workflow's table of contents.
# Every rule runs one `luffy <stage>` command; all logic lives in the luffy package.
from snakemake.utils import min_version

min_version("9.0")


# The demo config, unless a config was given (`--configfile config/other.yaml` replaces it
# rather than being merged into it, so experiments are never mixed across configs).
if not config:

    configfile: "config/config.yaml"



include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# `snakemake --report report.html`: the study's results table and plots in one file, on its front
# page (which names any result that changed after the report stage ran)
report: report_front_page()


onstart:
    # Once, before any job: the SLURM status command, the results folder's study, and the MLflow
    # store and parent runs (made here, before any job can race for them).
    start()


rule all:
    input:
        get_final_output(),
