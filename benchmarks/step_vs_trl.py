"""The local engine vs TRL's GRPOTrainer: seconds per GRPO step on the same work.

Both sides run, on the CPU, in processes of their own:
- the same model: the demo's tiny Qwen2 architecture with the same random weights (saved once);
- the same prompts: the demo's toy task rendered with the model's chat template (the same token
  ids on both sides, checked), 8 prompts x 8 samples per step, each prompt drawn at random;
- the same sampling: temperature 1, no top-k, no top-p, at most 64 new tokens, EOS ends a response;
- the same objective: one update per rollout (one mini-batch, one epoch), PPO-clip 0.2,
  advantages normalised by the group's std, the loss's token mean over the batch (TRL's
  `dapo`), no KL term, no entropy term, AdamW (lr 1e-5, betas 0.9/0.999, no weight decay),
  a constant schedule, gradient-norm clip 1.0, float32, no gradient checkpointing;
- the same grader, in the training process: ``luffy.reward.math.grade`` (math-verify).

A step is timed from the start of its rollout to the end of its optimizer step: the local
engine's ``rl_step``; TRL's Trainer step (``on_step_begin`` to ``on_step_end``). Runs alternate
A/B/A/B (``--rounds``), each run ``--warmup`` steps, then ``--steps`` timed ones. TRL runs in its
own environment, ``--trl-venv`` (default ``.venv-bench-trl``), created from
``envs/bench-trl.txt`` when missing; nothing is installed into ``.venv``.

Run: .venv/bin/python benchmarks/step_vs_trl.py [--steps 15] [--warmup 3] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, emit, run_timed, toy_model_and_data

REQUIREMENTS = ROOT / "envs" / "bench-trl.txt"
PROMPTS, N, NEW_TOKENS = 8, 8, 64
OBJECTIVE = {"lr": 1.0e-5, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "clip_ratio": 0.2, "grad_clip": 1.0}


# ---- the parent: the shared model and prompts, the TRL environment, the alternating runs ----

def trl_python(venv: Path) -> Path:
    """The TRL environment's Python, created (or refreshed) from envs/bench-trl.txt."""
    python, stamp = venv / "bin" / "python", venv / ".installed"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return python
    print(f"setting up TRL's environment in {venv} from {REQUIREMENTS.relative_to(ROOT)} (minutes, once)", flush=True)
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return python


def prepare(work: Path) -> None:
    """The tiny model (seeded random weights), the training parquet the local engine reads and
    the same rows as rendered prompts and gold answers for TRL."""
    from luffy.data.templates import encode_prompts
    from luffy.data.training import load_train_data

    _, tokenizer, rows = toy_model_and_data(work)
    data = load_train_data(str(work / "train.parquet"), tokenizer, 0.0, 1.0, False)
    rendered, ids = encode_prompts(tokenizer, rows["prompt"].tolist())
    assert ids == [list(p) for p in data.prompt_ids], "the local engine's prompts differ from the rendered ones"
    with (work / "prompts.jsonl").open("w") as f:
        for text, token_ids, answer in zip(rendered, ids, data.answers):
            f.write(json.dumps({"prompt": text, "ids": token_ids, "answer": answer}) + "\n")


def run_side(python: Path, side: str, work: Path, args) -> list[dict]:
    timed, seconds = run_timed(python, __file__, side, work, args)
    print(f"  {side:5s} run: {statistics.mean(s['seconds'] for s in timed):.3f} s/step over {len(timed)} steps "
          f"(median {statistics.median(s['seconds'] for s in timed):.3f}), responses mean "
          f"{statistics.mean(s['mean_length'] for s in timed):.1f} / max {max(s['max_length'] for s in timed):.0f} "
          f"tokens; the whole run {seconds:.0f} s", flush=True)
    return timed


def compare(args) -> None:
    python = trl_python(Path(args.trl_venv).resolve())
    with tempfile.TemporaryDirectory(prefix="step-vs-trl-") as tmp:
        work = Path(tmp)
        prepare(work)
        timed: dict[str, list[dict]] = {"local": [], "trl": []}
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}:", flush=True)
            for side in ("local", "trl"):
                timed[side] += run_side(Path(sys.executable) if side == "local" else python, side, work, args)
    print(f"\n{PROMPTS} prompts x {N} samples, <= {NEW_TOKENS} new tokens, {args.threads} threads, "
          f"{args.rounds} alternating rounds of {args.steps} timed steps per side:")
    print(f"{'engine':8s} {'s/step mean':>12s} {'median':>8s} {'min':>7s} {'max':>7s} {'resp. mean':>11s} "
          f"{'resp. max':>10s}")
    means = {}
    for side, rows in timed.items():
        seconds = [s["seconds"] for s in rows]
        means[side] = statistics.mean(seconds)
        print(f"{side:8s} {means[side]:12.3f} {statistics.median(seconds):8.3f} {min(seconds):7.3f} "
              f"{max(seconds):7.3f} {statistics.mean(s['mean_length'] for s in rows):11.1f} "
              f"{max(s['max_length'] for s in rows):10.0f}")
    print(f"\nlocal / TRL step time: {means['local'] / means['trl']:.2f}")


# ---- one side's run (in its own process) ----

def local_side(args) -> None:
    import torch

    import luffy.engines.local.trainer as local
    from luffy.config import resolve_train_config

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = resolve_train_config("step_vs_trl", {}, {
        "algorithm": "grpo", "engine": "local", "device": "cpu", "steps": args.warmup + args.steps,
        "prompts_per_step": PROMPTS, "n": N, "max_response_tokens": NEW_TOKENS, "temperature": 1.0,
        "mini_batches": 1, "ppo_epochs": 1, "clip": True, "std_normalize": True, "loss_agg": "token_mean",
        "entropy_coef": 0.0, "kl_coef": 0.0, "warmup_steps": 0, "micro_batch_tokens": 1 << 20, **OBJECTIVE})
    trainer = local.LocalTrainer(cfg, str(work / "train.parquet"), str(work / "model"), Path(tempfile.mkdtemp()))
    lengths: list[int] = []
    draw = trainer.sampler.draw

    def recording(*a, **k):
        out = draw(*a, **k)
        lengths.extend(len(r) for group in out.ids for r in group)
        return out

    trainer.sampler.draw = recording
    for step in range(args.warmup + args.steps):
        lengths.clear()
        began = time.perf_counter()
        trainer.rl_step(step)
        emit(step=step, seconds=time.perf_counter() - began, mean_length=statistics.mean(lengths),
             max_length=max(lengths))


def trl_side(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from luffy.reward.math import grade

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    assert tokenizer([r["prompt"] for r in rows])["input_ids"] == [r["ids"] for r in rows], \
        "TRL would see other prompt tokens than the local engine"
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)

    def reward(completions, answer, **_):
        return [grade(c, a).reward for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.began = time.perf_counter()

        def on_step_end(self, state_args, state, control, **_):
            self.seconds = time.perf_counter() - self.began

        def on_log(self, state_args, state, control, logs=None, **_):
            if logs and "completions/mean_length" in logs:
                emit(step=state.global_step - 1, seconds=self.seconds, mean_length=logs["completions/mean_length"],
                     max_length=logs["completions/max_length"])

    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        max_steps=args.warmup + args.steps, per_device_train_batch_size=PROMPTS * N, gradient_accumulation_steps=1,
        num_generations=N, steps_per_generation=1, num_iterations=1, max_completion_length=NEW_TOKENS,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=OBJECTIVE["clip_ratio"], loss_type="dapo",
        scale_rewards="group", entropy_coef=0.0, learning_rate=OBJECTIVE["lr"], adam_beta1=OBJECTIVE["beta1"],
        adam_beta2=OBJECTIVE["beta2"], weight_decay=OBJECTIVE["weight_decay"], optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=OBJECTIVE["grad_clip"], logging_steps=1,
        save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0, log_completions=False,
        disable_tqdm=True)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                callbacks=[Timer()]).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per run (>= 1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run (>= 0)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating local/TRL rounds (>= 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side (>= 1)")
    parser.add_argument("--trl-venv", default=str(ROOT / ".venv-bench-trl"), help="TRL's own environment")
    parser.add_argument("--side", choices=("local", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, least in (("steps", 1), ("warmup", 0), ("rounds", 1), ("threads", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if args.side == "local":
        local_side(args)
    elif args.side == "trl":
        trl_side(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
