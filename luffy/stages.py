"""One function per workflow stage: read inputs, call the package, write outputs atomically,
log an MLflow child run. ``luffy.cli`` maps each ``luffy <stage>`` command onto these."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from luffy import io
from luffy.config import (BaseModelConfig, BenchmarkSpec, ConfigError, DataConfig, EvaluationConfig,
                          ExternalModelConfig, ReportConfig, TinyModelConfig, TrainConfig, seed_of, to_dict,
                          train_settings_dict)
from luffy.compare import suite_headline, training_headline, views
from luffy.tracking import StageRun, config_hash

log = logging.getLogger(__name__)


def make_toy_traces(settings: DataConfig, out_dir: str, group: str, rule: str) -> None:
    from luffy.data.toy import make_toy_data

    with StageRun("make_toy_traces", group, rule, params=to_dict(settings)) as run:
        data = make_toy_data(settings.toy, settings.system_prompt)
        out = Path(out_dir)
        io.write_parquet(out / "raw_traces.parquet", data.raw_traces)
        io.write_parquet(out / "pretrain.parquet", data.pretrain)
        for split, frame in data.suites.items():
            io.write_parquet(out / f"suite_{split}.parquet", frame)
        counts = {"train_problems": len(data.raw_traces), "pretrain_problems": len(data.pretrain),
                  "traces": int(data.raw_traces["generations"].map(len).sum()),
                  **{f"suite_{k}_problems": len(v) for k, v in data.suites.items()}}
        run.log_metrics(counts)
        log.info("toy task: %s", counts)


def prepare_benchmark(settings: BenchmarkSpec, name: str, out: str, group: str, rule: str) -> None:
    from luffy.data.benchmarks import build_suite

    with StageRun("prepare_benchmark", group, rule, params={"suite": name, **to_dict(settings)},
                  job=f"{group}/prepare_benchmark/{name}") as run:
        frame = build_suite(name, settings)
        io.write_parquet(out, frame)
        run.log_metrics({f"{name}/problems": len(frame)})


def prepare_traces(settings: DataConfig, traces: str, tokenizer_path: str, out: str, report_path: str,
                   group: str, rule: str, validation_out: str | None = None) -> None:
    import functools

    from tqdm import tqdm

    from luffy.data.traces import PromptTemplate, TraceFilter, prepare_stream, resolve_sources, token_counter

    @functools.cache
    def counter():  # at the first count: an input file with wrong columns is refused before transformers loads
        from transformers import AutoTokenizer

        return token_counter(AutoTokenizer.from_pretrained(tokenizer_path))

    with StageRun("prepare_traces", group, rule, params={**to_dict(settings), "tokenizer": tokenizer_path}) as run:
        sources = resolve_sources(traces, settings.traces_split, settings.traces_config)
        flt = TraceFilter(lambda texts: counter()(texts), settings.max_trace_tokens,
                          PromptTemplate(settings.template, settings.system_prompt), settings.data_source,
                          settings.validation_fraction)
        began, complete = time.perf_counter(), False
        try:
            with tqdm(desc="prepare_traces", unit=" rows", mininterval=5.0) as bar:
                prepare_stream(sources, out, flt, settings.batch_rows, progress=bar.update,
                               validation_out=validation_out, max_rows=settings.max_rows)
            complete = True
        finally:  # the per-reason counts are written even when the stage fails
            report = flt.report
            summary = {"input": traces, "files": len(sources), "output": out, "complete": complete,
                       "template": settings.template, "max_trace_tokens": settings.max_trace_tokens,
                       "seconds": round(time.perf_counter() - began, 2), **report.as_dict()}
            io.write_json(report_path, summary)
        run.log_metrics({"rows_in": report.rows_in, "rows_out": report.rows_out,
                         "rows_validation": report.rows_validation,
                         **{f"dropped/{k}": v for k, v in report.dropped.items()},
                         **{f"malformed/{k}": v for k, v in report.malformed.items()},
                         **{f"generations_rejected/{k}": v for k, v in report.generations_rejected.items()}})
        run.log_artifacts([report_path])
        if report.malformed:
            log.warning("prepare_traces: malformed rows (counted, not used): %s", report.malformed)
        log.info("prepare_traces: %d rows in, %d out, dropped %s", report.rows_in, report.rows_out, report.dropped)


def make_base_model(settings: TinyModelConfig, system_prompt: str, corpus: str, out_dir: str, metrics_path: str,
                    group: str, rule: str, threads: int) -> None:
    import torch

    from luffy.data.schema import messages, read_parquet, require_columns
    from luffy.models.export import export_verified
    from luffy.models.tiny import build_tiny_model, pretrain
    from luffy.models.tokenizer import load_shipped_tokenizer

    torch.set_num_threads(threads)
    params = {**to_dict(settings), "system_prompt": system_prompt}
    with StageRun("make_base_model", group, rule, params=params) as run:
        frame = read_parquet(corpus, f"pre-training corpus {corpus}")
        require_columns(frame, ("problem", "trace"), f"pre-training corpus {corpus}")
        tokenizer = load_shipped_tokenizer()
        model = build_tiny_model(settings, tokenizer)
        lines = []

        def on_step(step: int, metrics: dict[str, float]) -> None:
            lines.append({"step": step, **metrics})
            run.log_metrics(metrics, step)

        began = time.perf_counter()
        pretrain(model, tokenizer, [messages(system_prompt, p) for p in frame["problem"]], frame["trace"].tolist(),
                 settings, on_step)
        run.log_metrics({"pretrain_time_s": time.perf_counter() - began,
                         "parameters": sum(p.numel() for p in model.parameters())})
        export_verified(model, tokenizer, out_dir, metadata={"stage": "make_base_model", **params})
        io.write_text(metrics_path, "".join(json.dumps(line) + "\n" for line in lines))


def prepare_base_model(settings: BaseModelConfig, out_dir: str, group: str, rule: str) -> None:
    """A copy of ``base_model.path`` with its config overrides and chat template applied."""
    from luffy.models.prepare import prepare_base_model as prepare

    with StageRun("prepare_base_model", group, rule, params=to_dict(settings)) as run:
        changed = prepare(settings.path, settings.config_overrides, settings.chat_template, out_dir,
                          stand_in=settings.stand_in if settings.stand_in.enabled else None)
        run.log_metrics({"changed_keys": len(changed)})


WRITER_LOCK = "writer.lock"  # in a training work directory: the process that writes it


def train(settings: TrainConfig, data: str, base_model: str, out_dir: str, metrics_out: str, work_root: str,
          group: str, rule: str, threads: int, validation: dict[str, Any] | None = None,
          runtime: dict[str, Any] | None = None, nodes: int = 1, gpus: int = 0,
          runtime_minutes: int | None = None, chain: bool = False) -> None:
    """Train one experiment with its engine, after a preflight that fails in seconds on data,
    template or grader problems that would otherwise show up hours later as zero reward. With
    ``chain``, inside SLURM, the engine stops at a checkpoint before the job's end and raises
    ``luffy.chain.TimeLimitReached`` (the CLI then requeues the job)."""
    from luffy.models import model_source

    model_source(base_model, "base model")  # before the engine's imports: a wrong path is refused at once
    from luffy.chain import job_deadline
    from luffy.engines.base import TrainJob
    from luffy.engines.registry import make_engine
    from luffy.preflight import preflight

    key = {"settings": train_settings_dict(settings), "data": data, "base": base_model}
    work_dir = Path(work_root) / config_hash({**key, "validation": validation} if validation else key)
    job = TrainJob(experiment=group, settings=settings, data=data, base_model=base_model, out_dir=Path(out_dir),
                   metrics_out=Path(metrics_out), work_dir=work_dir, threads=threads, validation=validation,
                   runtime=runtime, nodes=nodes, gpus=gpus,
                   time_limit_s=60.0 * runtime_minutes if runtime_minutes else None,
                   deadline=job_deadline() if chain else None)
    # one writer per work directory for the job's life: a second trainer (e.g. rerun after a killed
    # Snakemake left this one running) fails at once, naming the process that holds it
    with io.exclusive(work_dir / WRITER_LOCK, f"training work directory {work_dir}"):
        engine = make_engine(settings.engine)
        report = preflight(job, engine)
        params = {**train_settings_dict(settings), **({"validation": validation} if validation else {}),
                  **({"runtime": runtime} if runtime else {})}
        with StageRun("train", group, rule, params=params, resume_run_id=engine.resume_run_id(work_dir)) as run:
            run.log_metrics({f"preflight/{k}": v for k, v in report.items()})
            engine.train(job, sink=run.log_metrics, run_id=lambda: run.run_id)
            run.log_to_parent(training_headline(io.read_jsonl(metrics_out)))
            run.log_artifacts([metrics_out])


def convert(checkpoint_dir: str, out_dir: str, group: str, rule: str) -> None:
    from luffy.engines.base import read_manifest
    from luffy.engines.registry import make_engine

    manifest = read_manifest(checkpoint_dir)
    params = {"checkpoint": checkpoint_dir, "base_model": manifest["base_model"], "engine": manifest["engine"]}
    with StageRun("convert", group, rule, params=params) as run:
        diff = make_engine(manifest["engine"]).export(Path(checkpoint_dir), manifest, Path(out_dir))
        run.log_metrics({"probe_logits_max_abs_diff": diff})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def suite_run_metrics(suite: str, metrics: dict[str, Any]) -> dict[str, float]:
    """A suite's figures for its evaluate run: ``<suite>/<figure>``, and a mapping of figures
    one level down as ``<suite>/<figure>/<key>`` (``<suite>/grading_timeouts/<grader>``)."""
    out = {f"{suite}/{k}": v for k, v in metrics.items() if _number(v)}
    out.update({f"{suite}/{k}/{key}": v for k, values in metrics.items() if isinstance(values, dict)
                for key, v in values.items() if _number(v)})
    return out


def evaluate(settings: EvaluationConfig, model: str, suites: dict[str, str], out_dir: str, group: str, rule: str,
             threads: int, gpus: int = 0, external: tuple[str, ExternalModelConfig] | None = None) -> None:
    """Evaluate one model on its suites. An ``external`` model (``evaluation.models``: name and
    settings) is checked first, gets its own vLLM dtype / context, chat template and system
    prompt where it sets them, and its source (hub id, revision and the commit evaluated, or
    its directory) is recorded in every result file and in MLflow. Each suite's result file
    and run count the answers whose grading timed out, per grader (``grading_timeouts``)."""
    import dataclasses

    from luffy.models import check_external_model, model_source

    unknown = set(suites) - set(settings.suites)
    if unknown:
        raise ConfigError(f"--suite: {sorted(unknown)} have no settings in evaluation.suites (known: "
                          f"{sorted(settings.suites)})")
    source, revision, chat_template, system_prompt = None, None, None, None
    if external is None:
        model_source(model)
    else:
        name, ext = external
        source = check_external_model(name, ext)
        revision = source["commit"] or ext.revision  # the commit checked is the commit evaluated
        chat_template = Path(ext.chat_template).read_text() if ext.chat_template else None
        system_prompt = ext.system_prompt
        overrides = {k: getattr(ext, k) for k in ("dtype", "max_model_len") if getattr(ext, k) is not None}
        suites_cfg = {k: dataclasses.replace(v, max_tokens=min(v.max_tokens, ext.max_tokens)) if ext.max_tokens
                      else v for k, v in settings.suites.items()}
        settings = dataclasses.replace(settings, vllm=dataclasses.replace(settings.vllm, **overrides),
                                       suites=suites_cfg)
        source["max_tokens"] = ext.max_tokens
        log.info("external model %s: %s%s", name, source["source"],
                 f" (commit {source['commit']})" if source["commit"] else "")
    import torch  # after the checks above: bad input is refused in a second, before torch and vLLM load

    from luffy.evaluate.backends import make_backend
    from luffy.evaluate.runner import evaluate_model, grader_pool

    torch.set_num_threads(threads)
    params = {**to_dict(settings), "model": model,
              **({f"external/{k}": v for k, v in source.items()} if source else {}),
              **({"external/settings": to_dict(external[1])} if external else {})}
    with StageRun("evaluate", group, rule, params=params) as run, grader_pool(settings.grading, threads) as pool:
        began = time.perf_counter()
        backend = make_backend(model, settings, gpus=gpus, revision=revision)
        load_s = time.perf_counter() - began
        log.info("%s backend loaded %s in %.1fs", backend.name, model, load_s)
        results = evaluate_model(backend, model, {name: (path, settings.suites[name]) for name, path in suites.items()},
                                 settings.seed, pool, revision=revision, chat_template=chat_template,
                                 system_prompt=system_prompt)
        out = Path(out_dir)
        for name, result in results.items():
            io.write_parquet(out / f"{name}.parquet", result.samples)
            io.write_json(out / f"{name}.json", {"suite": name, "model": model, "backend": backend.name,
                                                 "settings": to_dict(settings.suites[name]),
                                                 **({"external": source} if source else {}), **result.metrics})
            run.log_metrics(suite_run_metrics(name, result.metrics))
            run.log_to_parent(suite_headline(name, result.metrics))
        run.log_metrics({"engine_load_s": load_s})
        run.log_artifacts([str(out / f"{name}.json") for name in results])


def report(settings: ReportConfig, eval_dir: str, models: list[str], suites: list[str],
           train_metrics: dict[str, str], out_dir: str, group: str, rule: str,
           suite_meta: dict[str, dict[str, Any]] | None = None, teacher_traces: dict[str, str] | None = None) -> str:
    from luffy.report.plots import results_bars, training_curves
    from luffy.report.publish import html_page
    from luffy.report.tables import (combined, combined_intervals, comparison_figures, external_sources, label,
                                     paired_differences, paper_layout, per_seed, per_seed_table, summarize,
                                     teacher_table, titled)

    meta = suite_meta or {}
    with StageRun("report", group, rule, params={**to_dict(settings), "models": models, "suites": suites}) as run:
        external = external_sources(eval_dir, models, suites)
        body, frames, intervals = paper_layout(eval_dir, models, suites, meta, settings.decimals, settings.published,
                                               settings.compare, external)
        teacher = teacher_table(teacher_traces or {})
        body += f"\n{teacher}" if teacher else ""
        table = combined(frames)
        out = Path(out_dir)
        markdown = f"## {settings.title}\n\n{body}"
        io.write_text(out / "results.md", markdown)
        io.write_text(out / "results.html", html_page(settings.title, markdown))
        with io.atomic_path(out / "results.csv", suffix=".csv") as tmp:
            per_seed(table, external).join(combined_intervals(intervals)).round(4).to_csv(tmp)
        mean, std, _ = summarize(table)
        marked = {m: label(m, external) for m in mean.index}
        results_bars(titled(mean, meta).rename(index=marked), titled(std, meta).rename(index=marked),
                     out / "results.png", settings.title)
        paths = [str(out / n) for n in ("results.md", "results.html", "results.csv", "results.png")]
        if train_metrics:
            training_curves(train_metrics, out / "training_curves.png")
            paths.append(str(out / "training_curves.png"))
        if settings.publish:
            from luffy.report.publish import publish

            discussion = Path(settings.discussion).read_text() if settings.discussion else None
            publish(settings.publish, settings.title, body,
                    per_seed_table(titled(table, meta), settings.decimals, external),
                    out, source=str(out), discussion=discussion, curves=bool(train_metrics))
            paths.append(settings.publish)
        run.log_metrics({f"{m}/{s}": float(v) for m, row in table.iterrows() for s, v in row.items()})
        for pair in settings.compare:
            a, b, diffs = paired_differences(table, pair)
            if len(diffs) >= 2:
                figures = comparison_figures(diffs)
                run.log_metrics({f"compare/{a}_vs_{b}/{s}/{k}": float(figures.loc[s, k])
                                 for s in figures.index for k in ("diff", "p")})
        run.log_artifacts(paths)
    return markdown


def teacher_traces(model: str, data: str, traces: int, out: str, group: str, rule: str, threads: int) -> None:
    """The teacher-token probabilities of the first ``traces`` training traces under ``model``."""
    import torch

    from luffy.models.scoring import teacher_token_probability

    torch.set_num_threads(threads)
    with StageRun("teacher_traces", group, rule, params={"model": model, "traces": traces}) as run:
        figures = teacher_token_probability(model, data, traces)
        io.write_json(out, {"model": model, **figures})
        run.log_metrics({f"teacher_traces/{k}": v for k, v in figures.items()})
    log.info("teacher tokens under %s: mean probability %.3f over %d tokens", model, figures["token_prob_mean"],
             figures["tokens"])


def init_tracking(resolved_config: dict[str, Any]) -> None:
    """Parent runs: one per experiment and one per external model, plus 'data' (shared stages),
    'report' and 'base' (or one per 'base-seed<N>' when the seeds vary the base model)."""
    from luffy.tracking import init_tracking as init

    # the external models' settings are theirs alone: the other parents keep their settings (and runs)
    evaluation = {k: v for k, v in resolved_config["evaluation"].items() if k != "models"}
    shared = {k: v for k, v in resolved_config.items() if k not in ("experiments", "train_defaults", "base_models")}
    shared["evaluation"] = evaluation
    groups = {"data": {"data": resolved_config["data"], "base_model": resolved_config["base_model"]},
              "report": shared}
    for base in resolved_config.get("base_models", ["base"]):
        groups[base] = {"base_model": resolved_config["base_model"], "evaluation": evaluation,
                        **({"seed": seed} if (seed := seed_of(base)) is not None else {})}
    for name, settings in resolved_config["experiments"].items():
        groups[name] = {"experiment": name, "train": settings, **shared}
    for name, settings in resolved_config["evaluation"].get("models", {}).items():
        groups[name] = {"external": settings, "evaluation": evaluation}
    init(groups, models=[g for g in groups if g not in ("data", "report")],
         views=views(list(resolved_config["evaluation"].get("suites", {}))))
