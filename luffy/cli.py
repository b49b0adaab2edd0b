"""``luffy <stage> ...``: one subcommand per workflow stage.

Stage settings arrive as canonical JSON (``--settings``), exactly what the Snakemake rule
carries in its params, so a rule reruns when, and only when, its settings change. Errors
that name a bad input (config, data schema, export mismatch) exit with status 2 and a
one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from luffy.config import (GE0, GE1, GREEDY_OK, SEED, SHARE, BaseModelConfig, BenchmarkSpec, ConfigError, DataConfig,
                          ReportConfig, TinyModelConfig, Valid, eval_job_settings, from_json,
                          resolve_train_config)

log = logging.getLogger("luffy")


def _setup_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values or []:
        if "=" not in value:
            raise ConfigError(f"{what}: expected NAME=PATH, got '{value}'")
        name, path = value.split("=", 1)
        out[name] = path
    return out


def _ranged(tp: type, valid: Valid):
    """An argparse type: a number of type ``tp`` within ``valid`` (else a usage error naming the range)."""
    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if tp is int else 'a number'}") from None
        if not valid.admits(value):
            raise argparse.ArgumentTypeError(f"{text} is not {valid.describe()}")
        return value
    parse.__name__ = tp.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luffy", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="store_true",
                        help="print the versions of luffy and the libraries its jobs import; exit 2 if one is missing")
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name: str, help_text: str, settings: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        if settings:
            p.add_argument("--settings", required=True, help="the stage's settings as JSON")
        p.add_argument("--group", default=name, help="MLflow parent run group (experiment name or shared group)")
        p.add_argument("--rule", default=None, help="the Snakemake rule (an MLflow tag)")
        p.add_argument("--log", default=None, help="also write the log to this file")
        p.add_argument("--threads", type=_ranged(int, GE1), default=2,
                       help="threads (inside a SLURM job: its --cpus-per-task, SLURM_CPUS_PER_TASK)")
        return p

    p = stage("make-toy-traces", "synthetic task: raw traces (OpenR1 schema), eval suites, format corpus")
    p.add_argument("--out-dir", required=True)

    p = stage("prepare-traces", "the LUFFY filter: OpenR1-schema traces -> training parquet + report")
    p.add_argument("--traces", required=True)
    p.add_argument("--tokenizer", required=True, help="policy tokenizer: model dir, hub id, or 'shipped'")
    p.add_argument("--out", required=True)
    p.add_argument("--validation-out", default=None, help="the held-out validation problems (benchmark schema)")
    p.add_argument("--report", required=True)

    p = stage("prepare-benchmark", "one registry benchmark -> a suite parquet (de-duplicated, counts checked)")
    p.add_argument("--name", required=True, help="the suite's name")
    p.add_argument("--out", required=True)

    p = stage("make-base-model", "build and briefly pre-train the tiny demo base model")
    p.add_argument("--system-prompt", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--metrics", required=True, help="pre-training loss per step (JSON lines)")

    p = stage("prepare-base-model", "a copy of base_model.path with its config overrides and chat template")
    p.add_argument("--out-dir", required=True)

    p = stage("train", "train one experiment with its engine (local or verl), after a preflight")
    p.add_argument("--data", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--work-dir", required=True, help="resumable checkpoints (not a workflow output)")
    p.add_argument("--nodes", type=_ranged(int, GE1), default=1, help="nodes of the job's allocation")
    p.add_argument("--gpus", type=_ranged(int, GE0), default=0, help="GPUs of the job's allocation, all nodes together")
    p.add_argument("--runtime", type=_ranged(int, GE1), default=None,
                   help="the job's run time in minutes (resources.runtime): a hard limit of verl runs on the CPU")
    p.add_argument("--chain", type=int, choices=(0, 1), default=0,
                   help="1: a part of a chain of SLURM jobs (resources.job_time_limit): stop at a checkpoint before "
                        "the job's end and requeue it to go on")

    p = stage("convert", "export a training checkpoint as a verified HuggingFace directory", settings=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out-dir", required=True)

    p = stage("evaluate", "evaluate one model on its suites with one engine load")
    p.add_argument("--model", required=True)
    p.add_argument("--suite", action="append", required=True, help="NAME=PATH (repeatable)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--gpus", type=_ranged(int, GE0), default=0,
                   help="GPUs of the job (vLLM's tensor parallelism when > 1)")

    p = stage("teacher-traces", "how probable the teacher's tokens are under a model (training traces, "
                                "teacher-forced)", settings=False)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="training parquet (LUFFY schema)")
    p.add_argument("--traces", type=_ranged(int, GE1), required=True, help="the first N traces")
    p.add_argument("--out", required=True)

    p = stage("report", "results table (Markdown, CSV) and plots")
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--suites", nargs="+", required=True)
    p.add_argument("--train-metrics", nargs="*", default=[], help="EXPERIMENT=metrics.jsonl")
    p.add_argument("--teacher-traces", nargs="*", default=[], help="MODEL=teacher_traces.json")
    p.add_argument("--suite-meta", default="{}", help="JSON: suite -> {group, title, benchmark} (the table layout)")
    p.add_argument("--out-dir", required=True)

    p = sub.add_parser("generate", help="answer one question with a model (the paper's inference example: "
                                        "its chat template, T=0.6)")
    p.add_argument("question")
    p.add_argument("--model", required=True, help="HF id or directory")
    p.add_argument("--system", default=None, help="system prompt (default: none, the model's template decides)")
    p.add_argument("--temperature", type=_ranged(float, GREEDY_OK), default=0.6)
    p.add_argument("--top-p", type=_ranged(float, SHARE), default=1.0)
    p.add_argument("--max-tokens", type=_ranged(int, GE1), default=8192)
    p.add_argument("--n", type=_ranged(int, GE1), default=1)
    p.add_argument("--seed", type=_ranged(int, SEED), default=0)
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf"))

    p = sub.add_parser("score-traces", help="add per-token teacher log-probs (teacher_logprobs) to a training "
                                            "parquet, for the true off-policy ratio pi_theta/pi_phi")
    p.add_argument("--teacher", required=True, help="the teacher model (HF id or directory)")
    p.add_argument("--tokenizer", required=True, help="the policy's tokenizer (must share the teacher's vocabulary)")
    p.add_argument("--data", required=True, help="training parquet in the LUFFY schema")
    p.add_argument("--out", required=True)
    p.add_argument("--micro-batch-tokens", type=_ranged(int, GE0), default=8192)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("init-tracking", help="create the MLflow store and parent runs (once, before jobs)")
    p.add_argument("--resolved-config", required=True, help="the resolved config as JSON")

    p = sub.add_parser("compare", help="the study's comparison in the MLflow UI: store its views and print their URLs "
                                       "(one row per model with accuracy and intervals; training curves)")
    p.add_argument("configfile")
    p.add_argument("--port", type=_ranged(int, Valid(low=1, high=65535)), default=5000,
                   help="the port of `mlflow ui` (SQLite stores)")
    p.add_argument("--serve", action="store_true", help="also run `mlflow ui` on the config's SQLite store")

    p = sub.add_parser("tracking-server", help="the study's MLflow tracking server with authentication: creates its "
                                               "store, admin and study user on first start, writes the study user's "
                                               "credentials (0600, tracking.credentials), prints the tracking.uri")
    p.add_argument("configfile")
    p.add_argument("--add-reader", metavar="NAME", default=None,
                   help="on the running server, create user NAME with read-only access to the study's runs; its "
                        "credentials go to <tracking.server.dir>/NAME.credentials (0600)")

    p = sub.add_parser("check-config", help="validate a config file (and --config overrides) and print it resolved")
    p.add_argument("configfile")

    p = sub.add_parser("rehearse", help="a config's whole DAG on the CPU in minutes, with what costs GPUs shrunk "
                                        "(a stand-in base model, few rows, 2 steps, short generations), before its "
                                        "GPU run; Snakemake arguments follow `--`")
    p.add_argument("configfile")
    p.add_argument("--cores", type=_ranged(int, GE1), default=None, help="cores for Snakemake (default: all)")
    p.add_argument("--response-tokens", type=_ranged(int, GE1), default=None,
                   help="cap of traces and responses in tokens (default 1024)")
    p.add_argument("--nodes", type=_ranged(int, GE1), default=1,
                   help="nodes of each training job (>= 1; default 1); above 1 the jobs go to a SLURM cluster: "
                        "pass its profile after `--`, e.g. `-- --profile slurm` (verl experiments only)")
    p.add_argument("--snakemake", default=None, metavar="PATH",
                   help="the Snakemake to run (default: the one beside luffy); e.g. the submitting environment's, "
                        "which has the SLURM executor")
    p.add_argument("--snakemake-args", nargs="*", default=[], help=argparse.SUPPRESS)  # what follows `--`

    sub.add_parser("schema", help="print the config JSON schema (workflow/schemas/config.schema.yaml)")
    p = sub.add_parser("settings", help="print the settings reference of config/README.md (every setting, its "
                                        "type, default and valid values)")
    p.add_argument("--update", default=None, metavar="README", help="rewrite the reference block of this file")
    return parser


def _tokenizer_path(value: str) -> str:
    if value == "shipped":
        from luffy.models import SHIPPED_DIR

        return str(SHIPPED_DIR)
    from luffy.models import TOKENIZER_FILES, model_source

    return model_source(value, "tokenizer", TOKENIZER_FILES)


def allocated_threads(requested: int, env: dict[str, str] | None = None) -> int:
    """The threads a stage uses: inside a SLURM job the cores it was given (Snakemake caps the
    ``--threads`` it passes at its own ``--cores``), else what the workflow asked for."""
    env = os.environ if env is None else env
    cores = env.get("SLURM_CPUS_PER_TASK", "")
    return int(cores) if cores.isdigit() and int(cores) > 0 else requested


def run(args: argparse.Namespace) -> None:
    from luffy import stages

    if hasattr(args, "threads"):
        args.threads = allocated_threads(args.threads)

    common = {"group": getattr(args, "group", None), "rule": getattr(args, "rule", None) or args.stage}
    if hasattr(args, "group") or args.stage == "init-tracking":  # a stage that logs to MLflow: its access first
        from luffy.tracking import check_access

        check_access()
    if args.stage == "make-toy-traces":
        stages.make_toy_traces(from_json(DataConfig, args.settings), args.out_dir, **common)
    elif args.stage == "prepare-traces":
        stages.prepare_traces(from_json(DataConfig, args.settings), args.traces, _tokenizer_path(args.tokenizer),
                              args.out, args.report, validation_out=args.validation_out, **common)
    elif args.stage == "prepare-benchmark":
        stages.prepare_benchmark(from_json(BenchmarkSpec, args.settings), args.name, args.out, **common)
    elif args.stage == "make-base-model":
        stages.make_base_model(from_json(TinyModelConfig, args.settings), args.system_prompt, args.corpus,
                               args.out_dir, args.metrics, threads=args.threads, **common)
    elif args.stage == "prepare-base-model":
        stages.prepare_base_model(from_json(BaseModelConfig, args.settings), args.out_dir, **common)
    elif args.stage == "train":
        raw = json.loads(args.settings)
        validation = raw.pop("validation", None)  # in-training validation rides along when on
        runtime = raw.pop("runtime", None)  # the verl engine's cluster layout
        settings = resolve_train_config(args.group, {}, raw)
        from luffy.chain import TimeLimitReached, requeue
        from luffy.engines.base import EngineError

        try:
            stages.train(settings, args.data, args.base_model, args.out_dir, args.metrics, args.work_dir,
                         threads=args.threads, validation=validation, runtime=runtime, nodes=args.nodes,
                         gpus=args.gpus, runtime_minutes=args.runtime, chain=bool(args.chain), **common)
        except TimeLimitReached as stop:
            try:
                requeue(stop)  # returns only when SLURM did not end this part
            except RuntimeError as err:
                raise EngineError(str(err)) from None
    elif args.stage == "convert":
        stages.convert(args.checkpoint, args.out_dir, **common)
    elif args.stage == "evaluate":
        settings, external = eval_job_settings(args.settings)
        stages.evaluate(settings, args.model, _pairs(args.suite, "--suite"), args.out_dir, threads=args.threads,
                        gpus=args.gpus, external=external, **common)
    elif args.stage == "teacher-traces":
        stages.teacher_traces(args.model, args.data, args.traces, args.out, threads=args.threads, **common)
    elif args.stage == "report":
        print(stages.report(from_json(ReportConfig, args.settings), args.eval_dir, args.models, args.suites,
                            _pairs(args.train_metrics, "--train-metrics"), args.out_dir,
                            suite_meta=json.loads(args.suite_meta),
                            teacher_traces=_pairs(args.teacher_traces, "--teacher-traces"), **common))
    elif args.stage == "generate":
        from luffy.evaluate.generate import generate_answers

        for i, text in enumerate(generate_answers(args.model, args.question, args.system, args.temperature, args.top_p,
                                                  args.max_tokens, args.n, args.seed, args.backend)):
            print(f"--- sample {i} ---\n{text}" if args.n > 1 else text)
    elif args.stage == "score-traces":
        from luffy.models.scoring import score_traces

        score_traces(args.teacher, _tokenizer_path(args.tokenizer), args.data, args.out, args.micro_batch_tokens,
                     args.device)
    elif args.stage == "init-tracking":
        stages.init_tracking(json.loads(args.resolved_config))
    elif args.stage == "compare":
        from luffy.compare import compare
        from luffy.config import load_config_file

        from luffy.tracking import CREDENTIALS_ENV, use_credentials

        root = load_config_file(args.configfile).root
        use_credentials(os.environ.get(CREDENTIALS_ENV) or root.tracking.credentials)
        compare(os.environ.get("MLFLOW_TRACKING_URI", root.tracking.uri),
                os.environ.get("MLFLOW_EXPERIMENT_NAME", root.tracking.experiment), list(root.evaluation.suites),
                port=args.port, serve=args.serve)
    elif args.stage == "tracking-server":
        from luffy.config import load_config_file
        from luffy.tracking_server import add_reader, serve

        tracking = load_config_file(args.configfile).root.tracking
        if args.add_reader:
            print(add_reader(tracking, args.add_reader))
        else:
            serve(tracking)
    elif args.stage == "check-config":
        from luffy.config import load_config_file, to_dict

        resolved = load_config_file(args.configfile)
        print(json.dumps({"root": to_dict(resolved.root), "experiments": to_dict(resolved.experiments)}, indent=2))
    elif args.stage == "rehearse":
        import dataclasses

        from luffy.rehearsal import Scale, rehearse

        scale = Scale() if args.response_tokens is None else dataclasses.replace(Scale(),
                                                                                  response_tokens=args.response_tokens)
        table = rehearse(args.configfile, args.cores, scale, args.snakemake_args, args.nodes, args.snakemake)
        if table.exists():
            print(table.read_text())
    elif args.stage == "schema":
        import yaml

        from luffy.config import json_schema

        print(yaml.safe_dump(json_schema(), sort_keys=False, width=100), end="")
    elif args.stage == "settings":
        from luffy.config import settings_reference, update_settings_block

        if args.update:
            update_settings_block(args.update)
        else:
            print(settings_reference(), end="")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # the workflow's check of the jobs' command, before any job
        from luffy.jobenv import version_check

        description, problem = version_check()
        print(description)
        if problem:
            print(f"luffy: error: {problem}", file=sys.stderr)
            return 2
        return 0
    passed_on = []
    if argv[:1] == ["rehearse"] and "--" in argv:  # luffy rehearse CONFIG [options] -- SNAKEMAKE ARGUMENTS
        cut = argv.index("--")
        argv, passed_on = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if args.stage == "rehearse":
        args.snakemake_args = passed_on
    from luffy.errors import (Busy, Cancelled, DataError, DiskFull, EngineError, ExportMismatch, ModelUnreadable,
                              RehearsalFailed, cancellable)

    try:
        _setup_logging(getattr(args, "log", None))
        with cancellable():  # SIGTERM or Ctrl-C unwinds: the run's processes ended, its MLflow run marked KILLED
            run(args)
    except (ConfigError, DataError, ExportMismatch, json.JSONDecodeError, EngineError, Busy, DiskFull,
            ModelUnreadable, RehearsalFailed, OSError, UnicodeDecodeError) as err:
        return _refuse(args.stage, err)
    except Cancelled as err:
        logging.getLogger("luffy").error("luffy %s: %s", args.stage, err)
        logging.shutdown()
        # then end by the signal, as the process would have without the cleanup (a shell reports
        # 128 + its number; SLURM's requeue of a chained job expects its job ended by SIGTERM)
        signal.signal(err.signum, signal.SIG_DFL)
        os.kill(os.getpid(), err.signum)
        return 128 + err.signum
    return 0


def _refuse(stage: str, err: Exception) -> int:
    """Bad input ends a command with one line on stderr (also in the job's log file) and exit
    status 2. A file the system cannot open is named with the system's reason."""
    from luffy.errors import DiskFull, one_line

    if isinstance(err, OSError) and err.filename is not None and not isinstance(err, DiskFull):
        text = f"{err.filename}: {err.strerror or err}"
    elif isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text ({err.reason} at byte {err.start})"
    else:
        text = str(err)
    line = f"luffy {stage}: error: {one_line(text)}"
    record = logging.LogRecord("luffy", logging.ERROR, __file__, 0, "%s", (line,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
