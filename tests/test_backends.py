"""Both generation backends produce graded samples from the tiny model (engine's n, no duplicated rows)."""

import pytest

from luffy.config import EvaluationConfig, GradingConfig, SuiteConfig, ToyTaskConfig, VllmConfig, resolve_suite
from luffy.data.toy import make_toy_data
from luffy.evaluate.backends import HFBackend, VllmBackend, vllm_available
from luffy.evaluate.runner import evaluate_model, grader_pool
from luffy.reward.math import REASONS


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    out = tmp_path_factory.mktemp("suites")
    data = make_toy_data(ToyTaskConfig(n_train=1, n_pretrain=1, n_eval_id=6, n_eval_ood=4), "Be brief.")
    paths = {}
    for split, frame in data.suites.items():
        paths[f"toy_{split}"] = str(out / f"{split}.parquet")
        frame.to_parquet(paths[f"toy_{split}"])
    out = {}
    for name, path in paths.items():
        suite = SuiteConfig(source=path, n=3 if name == "toy_id" else 2, temperature=1.0, max_tokens=12,
                            system_prompt="keep", grader="boxed" if name == "toy_ood" else None)
        resolve_suite(suite, None, name)
        out[name] = (path, suite)
    return out


def check_results(results):
    assert set(results) == {"toy_id", "toy_ood"}
    for name, problems, n in (("toy_id", 6, 3), ("toy_ood", 4, 2)):
        samples, metrics = results[name].samples, results[name].metrics
        assert len(samples) == problems * n
        assert sorted(samples["sample_index"].unique()) == list(range(n))
        assert metrics["n"] == n and metrics["problems"] == problems
        assert set(samples["reason"]) <= set(REASONS)
        assert samples["completion"].map(lambda s: isinstance(s, str)).all()
        assert 0.0 <= metrics["accuracy"] <= 1.0
        # both math graders' verdicts are kept; the suite's grader is the one that counts
        counted = "boxed" if name == "toy_ood" else "math_verify"
        assert (samples["correct"] == samples[f"correct_{counted}"]).all()
        assert {"correct_math_verify", "correct_boxed", "reason_boxed", "extracted_math_verify"} <= set(samples)
        assert metrics["grader"] == counted and metrics["accuracy_ci_low"] <= metrics["accuracy"]


def test_hf_backend_generates_graded_samples(tiny_model_dir, suites):
    cfg = EvaluationConfig(backend="hf", suites={k: v[1] for k, v in suites.items()})
    with grader_pool(GradingConfig(timeout_s=2.0), workers=2) as pool:
        check_results(evaluate_model(HFBackend(tiny_model_dir, cfg), tiny_model_dir, suites, seed=0, pool=pool))


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_vllm_backend_generates_graded_samples(tiny_model_dir, suites):
    cfg = EvaluationConfig(backend="vllm", suites={k: v[1] for k, v in suites.items()},
                           vllm=VllmConfig(gpu_memory_utilization=0.2, enforce_eager=True, dtype="float32"))
    with grader_pool(GradingConfig(timeout_s=2.0), workers=2) as pool:
        check_results(evaluate_model(VllmBackend(tiny_model_dir, cfg), tiny_model_dir, suites, seed=0, pool=pool))


class RecordingBackend(HFBackend):
    """The real HF backend, which also keeps the token ids it is asked to continue (what the
    prompt rendering under test produced)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts = []

    def generate(self, prompts, sampling):
        self.prompts += [list(p) for p in prompts]
        return super().generate(prompts, sampling)


def test_an_external_models_chat_template_and_system_prompt_shape_its_prompts(tiny_model_dir, suites, tmp_path):
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    grading = GradingConfig(timeout_s=2.0)
    cfg = EvaluationConfig(backend="hf", suites={k: v[1] for k, v in suites.items()})
    default, custom = RecordingBackend(tiny_model_dir, cfg), RecordingBackend(tiny_model_dir, cfg)
    with grader_pool(grading, workers=1) as pool:
        evaluate_model(default, tiny_model_dir, suites, seed=0, pool=pool)
        evaluate_model(custom, tiny_model_dir, suites, seed=0, pool=pool, chat_template=template,
                       system_prompt="Think, then answer.")
    first = tokenizer.decode(custom.prompts[0])
    assert first.startswith("[system] Think, then answer.\n[user] ") and first.endswith("[assistant] ")
    assert "Be brief." not in first  # the suite's own system message is replaced
    assert "Be brief." in tokenizer.decode(default.prompts[0]) and "[system]" not in tokenizer.decode(default.prompts[0])
    assert len(custom.prompts) == len(default.prompts) == 10
