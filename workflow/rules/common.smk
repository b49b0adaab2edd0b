# Config validation, paths and input functions. Imported first by the Snakefile.
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from luffy import workflow as wf
from luffy.config import ConfigError, load_config


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


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "(?!x)x",
    model="|".join(MODELS),
    base="|".join(BASE_MODELS),
    suite="|".join(BENCHMARK_SUITES) or "(?!x)x",


def init_tracking():
    wf.init_tracking(CFG)


def get_final_output():
    return wf.report_outputs(CFG)
