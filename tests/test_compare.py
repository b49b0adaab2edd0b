"""The study's comparison in the MLflow UI, as a person sees it: MLflow's own server and UI,
opened in headless Chromium at the URLs ``luffy compare`` prints (CI installs Chromium:
``.ci/run``). The store is written by the pipeline's tracking code, with a rerun evaluation."""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from tracking_server import free_port

REPO = Path(__file__).resolve().parents[1]
MICRO = Path(__file__).with_name("micro.yaml")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium (.ci/run does)")]


def page_text(url: str) -> str:
    """The rendered page's text: Chromium's DOM after the UI's scripts ran."""
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                          "--virtual-time-budget=20000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def write_store(tmp_path: Path) -> None:
    """What the workflow writes for two experiments and the base model: parents, evaluations
    (luffy's twice: a rerun), training curves."""
    from luffy.compare import training_headline, views
    from luffy.tracking import StageRun, init_tracking

    models = ["base", "grpo", "luffy"]
    init_tracking({g: {"g": g} for g in ["data", "report", *models]}, models=models,
                  views=views(["toy_id", "toy_ood"]))
    for model, accuracy in (("base", 10.0), ("grpo", 20.0), ("luffy", 5.0), ("luffy", 30.0)):
        with StageRun("evaluate", model) as run:
            run.log_metrics({"toy_id/accuracy": accuracy / 100})
            run.log_to_parent({"toy_id/accuracy_pct": accuracy, "toy_id/accuracy_pct_ci_low": accuracy - 1,
                               "toy_id/accuracy_pct_ci_high": accuracy + 1, "toy_ood/accuracy_pct": accuracy / 2})
    for model in ("grpo", "luffy"):
        with StageRun("train", model) as run:
            lines = [{"loss/total": 2.0 - step / 10, "reward/on_policy_mean": step / 10} for step in range(5)]
            for step, line in enumerate(lines):
                run.log_metrics(line, step)
            run.log_to_parent(training_headline(lines))


def test_the_comparison_opens_on_one_row_per_model_with_accuracy_and_the_curves(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "luffy-compare")
    write_store(tmp_path)
    config = yaml.safe_load(MICRO.read_text())
    config["tracking"] = {"uri": store, "experiment": "luffy-compare"}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))

    port = free_port()
    printed = subprocess.run([str(BIN / "luffy"), "compare", "study.yaml", "--port", str(port)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    models_url, curves_url = re.findall(r"(http://127\.0\.0\.1:\d+/#/\S+)", printed.stdout)
    assert "viewStateShareKey=luffy-models" in models_url and "compareRunsMode=CHART" in curves_url

    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        table = page_text(models_url)
        assert "LUFFY: models" in table and "3 matching runs" in table, table[-2000:]
        for column in ("toy_id/accuracy_pct", "toy_id/accuracy_pct_ci_low", "toy_id/accuracy_pct_ci_high",
                       "toy_ood/accuracy_pct", "train/final_reward_on_policy_mean"):
            assert column in table, column
        # one row per model, sorted by name, then each row's figures (accuracy, interval high, low; ood):
        # luffy's rerun shows its newest figures only, the data and report groups no row
        body = table.split("train/final_reward_on_policy_mean", 1)[1].split("matching runs")[0]
        assert re.findall(r"\b(base|grpo|luffy|data|report)\b", body) == ["base", "grpo", "luffy"], body
        figures = re.findall(r"\b(\d+) (\d+) (\d+) (\d+)\b", body)
        assert figures == [("10", "11", "9", "5"), ("20", "21", "19", "10"), ("30", "31", "29", "15")], body

        # both experiments' training runs, one chart section per metric family (the UI renders the
        # charts themselves lazily, as they scroll into view)
        charts = page_text(curves_url)
        assert "2 matching runs" in charts, charts[-2000:]
        for text in ("grpo/train", "luffy/train", "loss (1)", "reward (1)"):
            assert text in charts, charts.split("matching runs", 1)[-1][:1500]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_behind_authentication_the_comparison_opens_after_logging_in(tmp_path, monkeypatch):
    """The study's authenticated server (``luffy tracking-server``): ``luffy compare`` prints the
    server's URLs, the browser logs in (answers the server's challenge with the study user) and
    sees the same models view; without credentials the server lets nothing through."""
    from browser_login import page_text_after_login
    from tracking_server import authenticated_study

    with authenticated_study(tmp_path, MICRO, experiment="luffy-compare") as study:
        user, password = study.user()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "luffy-compare")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)  # as the stages log (luffy.tracking.use_credentials)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        write_store(tmp_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_"))}
        printed = subprocess.run([str(BIN / "luffy"), "compare", "study.yaml"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert printed.returncode == 0, printed.stderr
        assert password not in printed.stdout + printed.stderr
        models_url, _ = re.findall(rf"({re.escape(study.uri)}/#/\S+)", printed.stdout)
        assert "viewStateShareKey=luffy-models" in models_url

        with pytest.raises(urllib.error.HTTPError, match="401"):  # no login, no page data
            urllib.request.urlopen(f"{study.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        table = page_text_after_login(CHROMIUM, models_url, user, password,
                                      ready=lambda text: "3 matching runs" in text)  # "0 ...": still loading
        challenges = int(re.search(r"\[challenges: (\d+)\]", table).group(1))
        assert challenges >= 1  # the server asked, the browser logged in
        assert "LUFFY: models" in table and "3 matching runs" in table, table[-2000:]
        body = table.split("train/final_reward_on_policy_mean", 1)[1].split("matching runs")[0]
        assert re.findall(r"\b(base|grpo|luffy|data|report)\b", body) == ["base", "grpo", "luffy"], body
