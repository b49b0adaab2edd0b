"""What the benchmarks share: the toy training data and a seeded random model
(``step_vs_trl.py``, ``rollout_vllm.py``, ``gpu_check.py``), and for the alternating A/B ones
each side's run in a process of its own that prints one ``STEP {json}`` line per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP = "STEP "  # a side's per-step line on stdout


def emit(**record) -> None:
    """One step's figures, as the parent reads them."""
    print(STEP + json.dumps(record), flush=True)


def toy_model_and_data(work: Path, **model_settings):
    """A tiny Qwen2 with seeded random weights (``TinyModelConfig(**model_settings)``) exported
    to ``work/model``, and 256 toy training rows in ``work/train.parquet``; returns (model,
    tokenizer, rows)."""
    import torch

    from luffy.config import TinyModelConfig, ToyTaskConfig
    from luffy.data.toy import make_toy_data
    from luffy.data.traces import filter_traces
    from luffy.models.export import export_verified
    from luffy.models.tiny import build_tiny_model
    from luffy.models.tokenizer import load_shipped_tokenizer

    torch.manual_seed(0)
    tokenizer = load_shipped_tokenizer()
    model = build_tiny_model(TinyModelConfig(**model_settings), tokenizer)
    export_verified(model, tokenizer, work / "model")
    raw = make_toy_data(ToyTaskConfig(n_train=256, n_pretrain=1, n_eval_id=1, n_eval_ood=1), "S").raw_traces
    rows, _ = filter_traces(raw, lambda texts: [len(t) for t in texts], 128, "S", "toy")
    rows.to_parquet(work / "train.parquet")
    return model, tokenizer, rows


def run_timed(python: str, script: str, side: str, work: Path, args, *extra: str) -> tuple[list[dict], float]:
    """Run one side of ``script`` (``--side side``, the parent's ``--steps``, ``--warmup`` and
    ``--threads``, and ``extra``) to its end with ``python``; returns its timed steps (those after
    the warm-up, exactly ``args.steps`` of them, else the benchmark stops naming the side) and
    the run's seconds."""
    command = [str(python), str(script), "--side", side, *extra, "--work", str(work), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {side} run failed (exit status {done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(line[len(STEP):]) for line in done.stdout.splitlines() if line.startswith(STEP)]
    timed = [r for r in records if r["step"] >= args.warmup]
    if len(timed) != args.steps:
        sys.exit(f"the {side} run printed {len(timed)} timed steps, not {args.steps}:\n{done.stdout[-2000:]}")
    return timed, time.perf_counter() - began
