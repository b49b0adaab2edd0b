"""The local engine's step with vLLM rollouts (``rollout: vllm``) vs its own sampler (``hf``).

Two sizes, each with seeded random weights and the demo's toy prompts (the shipped tokenizer):
- ``demo``: the demo's tiny Qwen2 (hidden 128, 2 layers), 8 prompts x 8 (LUFFY: 7 samples +
  the trace), <= 64 new tokens;
- ``large``: hidden 1024, 8 layers (16 heads, 4 KV heads, MLP 2816: about 100M parameters),
  2 prompts x 4 (3 samples + the trace), 256-token responses (random weights rarely emit EOS).

A LUFFY step (rollout, grading, one update) is timed, and inside it the rollout (the sampler's
draws, vLLM's weight load included); the rollout's time per sampled token compares the two
samplers where their draws differ in length. Runs alternate hf / vllm (``--rounds``), each in its own
process: ``--warmup`` untimed steps (vLLM's first step builds its kernels), then ``--steps``.

Run: .venv/bin/python benchmarks/rollout_vllm.py [--size demo|large|both] [--steps 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit, run_timed, toy_model_and_data

SIZES = {
    "demo": {"model": {}, "prompts": 8, "n": 8, "tokens": 64},
    "large": {"model": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "num_kv_heads": 4,
                        "intermediate_size": 2816}, "prompts": 2, "n": 4, "tokens": 256},
}


def run_side(rollout: str, size: str, work: Path, args) -> list[dict]:
    timed, seconds = run_timed(sys.executable, __file__, rollout, work, args, "--size", size)
    print(f"  {rollout:4s} run: step {statistics.mean(s['seconds'] for s in timed):.3f} s, rollout "
          f"{statistics.mean(s['rollout'] for s in timed):.3f} s, responses mean "
          f"{statistics.mean(s['mean_length'] for s in timed):.1f} tokens; the whole run "
          f"{seconds:.0f} s", flush=True)
    return timed


def compare(args) -> None:
    for size in (("demo", "large") if args.size == "both" else (args.size,)):
        with tempfile.TemporaryDirectory(prefix="rollout-vllm-") as tmp:
            work = Path(tmp)
            model, _, _ = toy_model_and_data(work, **SIZES[size]["model"])
            print(f"{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
            timed: dict[str, list[dict]] = {"hf": [], "vllm": []}
            for r in range(args.rounds):
                print(f"{size}, round {r + 1} of {args.rounds}:", flush=True)
                for rollout in timed:
                    timed[rollout] += run_side(rollout, size, work, args)
        s = SIZES[size]
        print(f"\n{size}: {s['prompts']} prompts x {s['n']}, <= {s['tokens']} new tokens, {args.threads} threads, "
              f"{args.rounds} alternating rounds of {args.steps} timed steps per side:")
        print(f"{'rollout':8s} {'step s':>8s} {'rollout s':>10s} {'rest s':>8s} {'resp. mean':>11s} "
              f"{'rollout ms/token':>17s}")
        means = {}
        for rollout, rows in timed.items():
            step = statistics.mean(x["seconds"] for x in rows)
            roll = statistics.mean(x["rollout"] for x in rows)
            per_token = 1000 * sum(x["rollout"] for x in rows) / sum(x["tokens"] for x in rows)
            means[rollout] = (step, roll, per_token)
            print(f"{rollout:8s} {step:8.3f} {roll:10.3f} {step - roll:8.3f} "
                  f"{statistics.mean(x['mean_length'] for x in rows):11.1f} {per_token:17.2f}")
        (step_v, roll_v, _), (step_h, roll_h, _) = means["vllm"], means["hf"]
        print(f"vllm / hf: step {step_v / step_h:.2f}, rollout {roll_v / roll_h:.2f}, "
              f"rollout per sampled token {means['vllm'][2] / means['hf'][2]:.2f} (the sides' responses differ in "
              "length: different draws)\n", flush=True)


def side(args) -> None:
    import torch

    from luffy.config import resolve_train_config
    from luffy.engines.local.trainer import LocalTrainer

    torch.set_num_threads(args.threads)
    work, s = Path(args.work), SIZES[args.size]
    cfg = resolve_train_config("rollout_vllm", {}, {
        "algorithm": "luffy", "engine": "local", "device": "cpu", "steps": args.warmup + args.steps,
        "prompts_per_step": s["prompts"], "n": s["n"], "max_response_tokens": s["tokens"], "mini_batches": 1,
        "micro_batch_tokens": 4096, "lr": 1.0e-5, "rollout": args.side})
    trainer = LocalTrainer(cfg, str(work / "train.parquet"), str(work / "model"), Path(tempfile.mkdtemp()))
    lengths: list[int] = []
    spent = [0.0]
    draw = trainer.sampler.draw

    def timed_draw(*a, **k):
        began = time.perf_counter()
        out = draw(*a, **k)
        spent[0] += time.perf_counter() - began
        lengths.extend(len(r) for group in out.ids for r in group)
        return out

    trainer.sampler.draw = timed_draw
    for step in range(args.warmup + args.steps):
        lengths.clear()
        spent[0] = 0.0
        began = time.perf_counter()
        trainer.rl_step(step)
        seconds = time.perf_counter() - began
        emit(step=step, seconds=seconds, rollout=spent[0], mean_length=statistics.mean(lengths), tokens=sum(lengths))
    trainer.sampler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("demo", "large", "both"), default="both")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (>= 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run (>= 0)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating hf / vllm rounds (>= 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (>= 1)")
    parser.add_argument("--side", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, least in (("steps", 1), ("warmup", 0), ("rounds", 1), ("threads", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if args.side:
        side(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
