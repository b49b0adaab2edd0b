"""The real Snakemake DAG on a micro config: outputs, MLflow runs, no-op rerun, targeted reruns, bad config."""

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MICRO = Path(__file__).with_name("micro.yaml")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    cores = [] if "--cores" in args else ["--cores", "2"]  # a local run names its cores (no default profile)
    return subprocess.run(["snakemake", "-s", str(REPO / "Snakefile"), "--printshellcmds", *cores, *args], cwd=workdir,
                          env=env,
                          capture_output=True, text=True)


def write_config(workdir: Path, name: str, **experiment_overrides) -> str:
    cfg = yaml.safe_load(MICRO.read_text())
    cfg["report"].update(publish="docs/micro.md", discussion="discussion.md")
    for exp, overrides in experiment_overrides.items():
        cfg["experiments"][exp].update(overrides)
    (workdir / name).write_text(yaml.safe_dump(cfg))
    return name


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = dry_run_output.split("Job stats:")[1].splitlines()[3:]
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        out[parts[0]] = int(parts[1])
    return out


def embedded_files(report_html: str) -> dict[str, bytes]:
    """The files a Snakemake HTML report embeds: output path -> content."""
    import base64
    import re

    keys = [(m.start(), m.group(1)) for m in re.finditer(r'"(results/[^"]+)": \{', report_html)]
    out = {}
    for uri in re.finditer(r'"data_uri": "data:[^"]*?;base64,([^"]+)"', report_html):
        owner = [path for start, path in keys if start < uri.start()]
        if owner:
            out[owner[-1]] = base64.b64decode(uri.group(1))
    return out


def external_models(where: Path) -> dict[str, dict]:
    """Two tiny models made here stand in for published checkpoints (nothing is downloaded),
    with per-model settings: a token cap, a system prompt and a chat template of their own."""
    from luffy.config import TinyModelConfig
    from luffy.models.export import export_verified
    from luffy.models.tiny import build_tiny_model
    from luffy.models.tokenizer import load_shipped_tokenizer

    tokenizer = load_shipped_tokenizer()
    for name, seed in (("ext_a", 1), ("ext_b", 2)):
        model = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=64, seed=seed), tokenizer)
        export_verified(model, tokenizer, where / "elsewhere" / name)
    (where / "plain.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return {"ext_a": {"path": str(where / "elsewhere" / "ext_a"), "max_tokens": 8},
            "ext_b": {"path": str(where / "elsewhere" / "ext_b"), "system_prompt": "Answer.",
                      "chat_template": "plain.jinja"}}


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory):
    """The micro config's whole DAG, run once for the tests below: three experiments, the base
    model, and two external models scored beside them. A test that edits ``micro.yaml`` for a
    dry run puts it back (``study_config``)."""
    workdir = tmp_path_factory.mktemp("micro")
    (workdir / "discussion.md").write_text("## Discussion\n\nHand-written words.\n")
    cfg = yaml.safe_load(MICRO.read_text())
    cfg["report"].update(publish="docs/micro.md", discussion="discussion.md")
    cfg["evaluation"]["models"] = external_models(workdir)
    (workdir / "micro.yaml").write_text(yaml.safe_dump(cfg))
    run = snakemake(workdir, "--configfile", "micro.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


@contextlib.contextmanager
def study_config(workdir: Path, edit) -> Iterator[str]:
    """``micro.yaml`` edited by ``edit(cfg)`` for the block's dry runs, then put back as it was
    (the results folder belongs to that file: another file's runs are refused)."""
    path = workdir / "micro.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    try:
        yield "micro.yaml"
    finally:
        path.write_text(original)


@pytest.mark.slow
def test_micro_pipeline_end_to_end(micro_study):
    tmp_path, config = micro_study, "micro.yaml"
    results = tmp_path / "results"
    table = (results / "report" / "results.md").read_text()
    for row in ("| base |", "| grpo |", "| sft |", "| luffy |"):
        assert row in table
    assert "| Model | toy_id | toy_ood | Avg |" in table
    for name in ("results.csv", "results.png", "training_curves.png"):
        assert (results / "report" / name).stat().st_size > 0
    published = (tmp_path / "docs" / "micro.md").read_text()
    assert "| luffy |" in published and published.rstrip().endswith("Hand-written words.")
    assert "![training curves](micro/training_curves.png)" in published
    assert (tmp_path / "docs" / "micro" / "training_curves.png").stat().st_size > 0
    report = yaml.safe_load((results / "data" / "prepare_report.json").read_text())
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())
    assert (results / "models" / "luffy" / "model.safetensors").exists()
    assert (results / "logs" / "train" / "luffy.log").exists()

    # MLflow: a parent per experiment and shared group, stage children tagged with their rule
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("luffy-micro").experiment_id])
    parents = {r.data.tags["luffy.group"]: r.info.run_id for r in runs if r.data.tags.get("luffy.role") == "parent"}
    assert set(parents) == {"data", "base", "report", "grpo", "sft", "luffy", "ext_a", "ext_b"}
    children = [r for r in runs if r.data.tags.get("luffy.role") == "stage"]
    stages = {(r.data.tags["luffy.group"], r.data.tags["luffy.stage"]) for r in children}
    for exp in ("grpo", "sft", "luffy"):
        assert {(exp, "train"), (exp, "convert"), (exp, "evaluate")} <= stages
    assert {("data", "make_toy_traces"), ("data", "prepare_traces"), ("base", "make_base_model"),
            ("base", "evaluate"), ("report", "report")} <= stages
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[run.data.tags["luffy.group"]]
        assert run.data.tags["snakemake.rule"] == run.data.tags["luffy.stage"]
        assert run.info.status == "FINISHED"
    luffy_train = next(r for r in children if r.data.tags["luffy.group"] == "luffy"
                       and r.data.tags["luffy.stage"] == "train")
    assert luffy_train.data.params["lr"] == "0.001"
    for metric in ("off_policy/token_share", "off_policy/shaped_weight_mean", "reward/on_policy_mean",
                   "reward/off_policy_mean", "accuracy/on_policy", "entropy", "loss/total", "step_time_s",
                   "response_length/on_policy"):
        history = client.get_metric_history(luffy_train.info.run_id, metric)
        assert sorted(m.step for m in history) == [0, 1], metric
    # the parents carry the headline figures (the UI's runs table compares experiments at a glance)
    for group in ("base", "grpo", "sft", "luffy"):
        headline = client.get_run(parents[group]).data.metrics
        for suite in ("toy_id", "toy_ood"):
            assert 0.0 <= headline[f"{suite}/accuracy_pct_ci_low"] <= headline[f"{suite}/accuracy_pct"] \
                <= headline[f"{suite}/accuracy_pct_ci_high"] <= 100.0, (group, suite)
    assert "train/final_reward_on_policy_mean" in client.get_run(parents["luffy"]).data.metrics
    assert "train/final_loss_sft" in client.get_run(parents["sft"]).data.metrics

    # Snakemake's HTML report: the results table and the plots, in one file
    report = snakemake(tmp_path, "--configfile", config, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    embedded = embedded_files((tmp_path / "report.html").read_text())
    table = embedded["results/report/results.html"].decode()
    for model in ("base", "grpo", "sft", "luffy"):
        assert f"<td>{model}</td>" in table
    for plot in ("results.png", "training_curves.png"):
        assert embedded[f"results/report/{plot}"] == (results / "report" / plot).read_bytes()
    assert embedded["results/report/results.csv"] == (results / "report" / "results.csv").read_bytes()

    # nothing to do on a second run
    began = time.perf_counter()
    again = snakemake(tmp_path, "--configfile", config)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert time.perf_counter() - began < 30

    # the report's front page: the table and plots in the page, and a result changed since named
    (results / "eval" / "base" / "toy_id.json").touch()
    stale = snakemake(tmp_path, "--configfile", config, "--report", "report.html")
    assert stale.returncode == 0, stale.stderr[-3000:]
    page = (tmp_path / ".snakemake" / "luffy-report-page.rst").read_text()
    assert "<td>luffy</td>" in page and page.count("data:image/png;base64") == 2
    assert "predate them:\n\n   - ``results/eval/base/toy_id.json``" in page

    # another config into these results is refused in one line naming both
    other = write_config(tmp_path, "other.yaml")
    refused = snakemake(tmp_path, "--configfile", other, "--dry-run")
    assert refused.returncode != 0
    assert ("results/ holds the study of micro.yaml (MLflow experiment 'luffy-micro'), not of this run's other.yaml: "
            "add --configfile micro.yaml") in refused.stdout + refused.stderr

    # one experiment's learning rate changed: only its train, convert, evaluate and the report rerun
    with study_config(tmp_path, lambda c: c["experiments"]["luffy"].update(lr=2.0e-3)) as changed:
        dry = snakemake(tmp_path, "--configfile", changed, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    output = dry.stdout + dry.stderr
    assert planned_jobs(output) == {"train": 1, "convert": 1, "evaluate": 1, "report": 1, "all": 1}
    assert "experiment=luffy" in output and "model=luffy" in output
    assert "experiment=grpo" not in output and "model=base" not in output


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["experiments"]["luffy"].update(lrr=1.0), "lrr"),
    (lambda c: c["train_defaults"].update(steps="many"), "steps"),
    (lambda c: c["evaluation"]["suites"]["toy_id"].update(source="/no/such/aime.parquet"), "/no/such/aime.parquet"),
    (lambda c: c["data"].update(traces="missing_openr1.parquet"), "missing_openr1.parquet"),
    (lambda c: c["experiments"]["luffy"].update(lrr=1.0), "'experiments.luffy.lrr': unknown setting; did you mean 'lr'?"),
    (lambda c: c["train_defaults"].update(grad_clip=-1.0), "'train_defaults.grad_clip': -1.0 is not > 0"),
    (lambda c: c["train_defaults"].update(warmup_steps=-2), "'train_defaults.warmup_steps': -2 is not >= 0"),
    (lambda c: c["report"].update(decimals=-1), "'report.decimals': -1 is not in [0, 6]"),
    (lambda c: c["evaluation"]["suites"]["toy_id"].update(top_p=1.5), "'evaluation.suites.toy_id.top_p': 1.5 is not in (0, 1]"),
])
def test_bad_config_stops_before_any_job(tmp_path, mutate, expected):
    """Snakemake stops with one line naming the key (no schema dump), and `luffy check-config` agrees."""
    cfg = yaml.safe_load(MICRO.read_text())
    cfg["report"]["publish"] = "docs/micro.md"  # nothing may be written there either
    mutate(cfg)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert len((result.stdout + result.stderr).splitlines()) < 10
    check = subprocess.run(["luffy", "check-config", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 2 and expected in check.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "docs").exists()
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)


@pytest.mark.slow
def test_seeds_that_vary_the_base_model_through_the_real_dag_and_bit_exact_reruns(tmp_path):
    """Two seeds, each with its own pre-trained base model (seed_scope: base): the report pairs
    the runs of each seed, and shows how probable the teacher's tokens are under every model.
    Retraining one run on the same machine reproduces its weights and evaluation bit for bit."""
    import hashlib

    import torch

    cfg = yaml.safe_load(MICRO.read_text())
    cfg.update(seeds=[0, 1], experiments={"luffy": {"algorithm": "luffy"}})
    cfg["report"].update(compare=["luffy vs base"], teacher_traces=4)
    (tmp_path / "seeded.yaml").write_text(yaml.safe_dump(cfg))
    first = snakemake(tmp_path, "--configfile", "seeded.yaml", "--cores", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "results"
    weights = [torch.load(results / "train" / f"luffy-seed{s}" / "final" / "model.pt") for s in (0, 1)]
    bases = [(results / "models" / f"base-seed{s}" / "model.safetensors").read_bytes() for s in (0, 1)]
    assert bases[0] != bases[1], "each seed pre-trains its own base model"
    assert not torch.equal(weights[0]["lm_head.weight"], weights[1]["lm_head.weight"])
    table = (results / "report" / "results.md").read_text()
    assert "| base | " in table and "+-" in table.split("| base | ")[1].splitlines()[0]  # base: mean +- std
    assert "| luffy - base | " in table and "(p " in table
    assert "| Model | teacher-token probability | share below 0.1 | n |" in table
    for model in ("base-seed0", "base-seed1", "luffy-seed0", "luffy-seed1"):
        figures = yaml.safe_load((results / "eval" / model / "teacher_traces.json").read_text())
        assert figures["traces"] == 4 and 0 < figures["token_prob_mean"] < 1

    def evaluation():
        """The samples' bytes and the figures of luffy-seed1's evaluation (not its timings, *_s)."""
        out = {}
        for suite in ("toy_id", "toy_ood"):
            samples = (results / "eval" / "luffy-seed1" / f"{suite}.parquet").read_bytes()
            figures = yaml.safe_load((results / "eval" / "luffy-seed1" / f"{suite}.json").read_text())
            out[suite] = (hashlib.sha256(samples).hexdigest(), {k: v for k, v in figures.items() if not k.endswith("_s")})
        return out

    before = evaluation()
    again = snakemake(tmp_path, "--configfile", "seeded.yaml", "--cores", "2", "--forcerun",
                      "results/train/luffy-seed1/final")
    assert again.returncode == 0, again.stderr[-3000:]
    retrained = torch.load(results / "train" / "luffy-seed1" / "final" / "model.pt")
    assert all(torch.equal(retrained[k], weights[1][k]) for k in weights[1])
    assert evaluation() == before


@pytest.mark.slow
def test_external_models_are_scored_beside_an_experiment_and_rerun_alone(micro_study):
    """The two external models of ``micro_study`` are evaluated by the same rule and suites as
    the config's own models, marked (external) with their source in the report, the results and
    MLflow; changing one's settings reruns only its evaluation and the report."""
    from mlflow.tracking import MlflowClient

    tmp_path = micro_study
    results = tmp_path / "results"
    table = (results / "report" / "results.md").read_text()
    for row in ("| base |", "| luffy |", "| ext_a (external) |", "| ext_b (external) |"):
        assert row in table, row
    assert (f"ext_a: path:{tmp_path}/elsewhere/ext_a, at most 8 new tokens; ext_b: path:{tmp_path}/elsewhere/ext_b."
            in table)
    assert yaml.safe_load((results / "eval" / "ext_a" / "toy_ood.json").read_text())["settings"]["max_tokens"] == 8
    assert f"path:{tmp_path}/elsewhere/ext_b" in (results / "report" / "results.csv").read_text()
    record = yaml.safe_load((results / "eval" / "ext_b" / "toy_id.json").read_text())
    assert record["external"]["source"] == f"path:{tmp_path}/elsewhere/ext_b" and record["model"].endswith("ext_b")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("luffy-micro").experiment_id])
    parents = {r.data.tags["luffy.group"] for r in runs if r.data.tags.get("luffy.role") == "parent"}
    assert {"ext_a", "ext_b", "luffy", "base"} <= parents
    evaluation = next(r for r in runs if r.data.tags.get("luffy.role") == "stage"
                      and r.data.tags["luffy.group"] == "ext_b" and r.data.tags["luffy.stage"] == "evaluate")
    assert evaluation.data.params["external/source"] == f"path:{tmp_path}/elsewhere/ext_b"
    assert evaluation.info.status == "FINISHED"

    with study_config(tmp_path, lambda c: c["evaluation"]["models"]["ext_b"].update(
            system_prompt="Answer in one line.")) as changed:
        dry = snakemake(tmp_path, "--configfile", changed, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    output = dry.stdout + dry.stderr
    assert planned_jobs(output) == {"evaluate": 1, "report": 1, "all": 1}
    assert "model=ext_b" in output and "model=ext_a" not in output and "model=luffy" not in output


def test_seeds_and_two_stage_experiments_expand_in_the_dag(tmp_path):
    cfg = yaml.safe_load(MICRO.read_text())
    cfg["seeds"] = [0, 1]
    cfg["experiments"] = {"sft_half": {"algorithm": "sft", "data_end": 0.5},
                          "sft_rl": {"algorithm": "grpo", "init_from": "sft_half", "data_start": 0.5}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(cfg))
    dry = snakemake(tmp_path, "--configfile", "grid.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    output = dry.stdout + dry.stderr
    jobs = planned_jobs(output)
    assert jobs["train"] == 4 and jobs["evaluate"] == 6 and jobs["make_base_model"] == 2
    for seed in (0, 1):
        # each seed pre-trains its own base model, and its first stage starts from it
        assert f"--out-dir results/models/base-seed{seed} " in output and f'"seed":{seed}' in output
        assert f"--base-model results/models/base-seed{seed} " in output
        # the second stage of each seed starts from that seed's converted first-stage model
        assert f"--base-model results/models/sft_half-seed{seed} " in output
    cfg["seed_scope"] = "training"  # the seeds vary the training runs only: one base model
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(cfg))
    dry = snakemake(tmp_path, "--configfile", "grid.yaml", "--dry-run")
    jobs = planned_jobs(dry.stdout + dry.stderr)
    assert jobs["evaluate"] == 5 and jobs["make_base_model"] == 1


def test_the_published_checkpoints_config_plans_evaluations_only(tmp_path):
    """config/eval_published.yaml: the base model and four hub checkpoints on the nine suites
    (a dry run: nothing is downloaded)."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    dry = snakemake(tmp_path, "--configfile", "config/eval_published.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    output = dry.stdout + dry.stderr
    assert planned_jobs(output) == {"prepare_base_model": 1, "prepare_benchmark": 9, "evaluate": 5, "report": 1,
                                    "all": 1}
    for model, hub in (("luffy_authors", "Elliott/LUFFY-Qwen-Math-7B-Zero"), ("oat_zero", "sail/Qwen2.5-Math-7B-Oat-Zero")):
        assert f"model={model}" in output and f"--model {hub} " in output


def test_paper_run_plans_data_training_conversion_evaluation_and_report(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    dry = snakemake(tmp_path, "--configfile", "config/experiments/paper_qwen2.5_math_7b.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    output = dry.stdout + dry.stderr
    assert planned_jobs(output) == {"prepare_base_model": 1, "prepare_benchmark": 9, "prepare_traces": 1, "train": 6,
                                    "convert": 6, "evaluate": 7, "report": 1, "all": 1}
    for experiment in ("luffy", "grpo", "rl_sft", "sft", "sft_half", "sft_rl"):
        assert f"experiment={experiment}" in output and f"model={experiment}" in output
    assert "--base-model results/paper_7b/models/sft_half " in output  # SFT then RL
    assert '"engine":"verl"' in output and '"runtime":{' in output


def test_jobs_find_luffy_when_snakemake_runs_without_the_venv_on_path(tmp_path):
    """`.venv/bin/snakemake` typed without activating the venv: the rules still run `luffy`."""
    import sys

    shutil.copy(MICRO, tmp_path / "micro.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_"))}
    env["PATH"] = "/usr/bin:/bin"
    snakemake_bin = Path(sys.executable).parent / "snakemake"
    result = subprocess.run([str(snakemake_bin), "results/data/toy/raw_traces.parquet", "-s", str(REPO / "Snakefile"),
                             "--cores", "2", "--printshellcmds", "--configfile", "micro.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results" / "data" / "toy" / "raw_traces.parquet").exists()
    assert f"{Path(sys.executable).parent / 'luffy'} make-toy-traces" in result.stdout + result.stderr
