# Config validation, paths and input functions. Imported first by the Snakefile.
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from luffy import startup
from luffy import workflow as wf
from luffy.config import ConfigError, load_config
from luffy.tracking import CREDENTIALS_ENV


try:  # first: a bad setting is one line naming the key, its value and its valid range
    CFG = load_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
validate(config, schema="../schemas/config.schema.yaml")  # the same rules, as the published JSON schema
RESULTS = CFG.root.results_dir
EXPERIMENTS = list(CFG.experiments)
MODELS = CFG.models
BASE_MODELS = CFG.base_models  # 'base', or 'base-seed<N>' per seed (seed_scope: base)
SUITES = list(CFG.root.evaluation.suites)
BENCHMARK_SUITES = list(CFG.benchmarks)  # suites materialised from the benchmark registry
LUFFY = wf.luffy_command()  # the jobs' `luffy`, also when the venv's bin/ is not on PATH
os.environ.setdefault("MLFLOW_TRACKING_URI", CFG.root.tracking.uri)
os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", CFG.root.tracking.experiment)
if CFG.root.tracking.credentials:  # every job (local or SLURM) logs in with the study user's file
    os.environ.setdefault(CREDENTIALS_ENV, os.path.abspath(os.path.expanduser(CFG.root.tracking.credentials)))
if workflow.is_main_process:  # once, where Snakemake is typed (also for -n); not again in each job
    for problem in (startup.job_command_problem(LUFFY, bool(os.environ.get(wf.LUFFY_COMMAND))),
                    startup.study_problem(RESULTS, workflow.configfiles, CFG.root.tracking.experiment),
                    startup.tracking_problem()):
        if problem:
            raise WorkflowError(problem)


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "(?!x)x",
    model="|".join(MODELS),
    base="|".join(BASE_MODELS),
    suite="|".join(BENCHMARK_SUITES) or "(?!x)x",


def start():
    """Before the first job: a SLURM status command that sees this cluster's jobs, the results
    folder claimed for this config, then the MLflow store and parent runs."""
    plugin = workflow.executor_plugin
    try:
        notice = startup.fit_executor(plugin.name if plugin else None, workflow.executor_settings)
        startup.claim_results_dir(RESULTS, workflow.configfiles, CFG.root.tracking.experiment)
    except ConfigError as err:
        raise WorkflowError(str(err)) from None
    if notice:
        logger.info(notice)
    wf.init_tracking(CFG)


def report_front_page():
    description = str(Path(workflow.basedir) / "workflow" / "report" / "workflow.rst")
    if not workflow.is_main_process:
        return description
    return wf.report_front_page(CFG, workflow.configfiles, description)


def get_final_output():
    return wf.report_outputs(CFG)
