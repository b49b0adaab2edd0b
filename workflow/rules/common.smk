# Config validation, paths and input functions. Imported first by the Snakefile.
import os

from snakemake.utils import validate

from luffy import workflow as wf
from luffy.config import load_config


validate(config, schema="../schemas/config.schema.yaml")
CFG = load_config(config)
RESULTS = CFG.root.results_dir
EXPERIMENTS = list(CFG.experiments)
MODELS = CFG.models
SUITES = list(CFG.root.evaluation.suites)
BENCHMARK_SUITES = list(CFG.benchmarks)  # suites materialised from the benchmark registry
LUFFY = wf.luffy_command()  # the jobs' `luffy`, also when the venv's bin/ is not on PATH
os.environ.setdefault("MLFLOW_TRACKING_URI", CFG.root.tracking.uri)
os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", CFG.root.tracking.experiment)


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "(?!x)x",
    model="|".join(MODELS),
    suite="|".join(BENCHMARK_SUITES) or "(?!x)x",


def init_tracking():
    wf.init_tracking(CFG)


def get_final_output():
    return wf.report_outputs(CFG)
