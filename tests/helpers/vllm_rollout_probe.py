"""The local engine with ``rollout: vllm`` on the CPU, probed in a process of its own (vLLM's CPU
worker binds this process's threads and memory policy, which would outlive the test in a pytest
process). Prints one JSON object; tests/test_rollout_vllm.py asserts on it.

usage: python vllm_rollout_probe.py MODEL_DIR TRAIN_PARQUET WORK_ROOT {sync,runs}

- sync: one step at a high learning rate, then one draw as step 1 would draw: the log-probs vLLM
  returns for its tokens against the trainer's teacher-forced log-probs after the step and
  before it (the starting weights);
- runs: the same seeded run twice in fresh work directories, and once resumed from the first
  run's step-2 checkpoint: their metrics and final weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from luffy.config import resolve_train_config
from luffy.engines.local import checkpoint
from luffy.engines.local.trainer import WEIGHTS, LocalTrainer
from luffy.models.sequences import build_batch, token_logprobs_and_entropy

SETTINGS = {"algorithm": "luffy", "steps": 3, "prompts_per_step": 2, "n": 4, "n_off": 1, "max_response_tokens": 40,
            "mini_batches": 1, "checkpoint_every": 1, "keep_checkpoints": 3, "rollout": "vllm"}


def teacher_forced(model, prompts, responses, pad_id) -> list[list[float]]:
    batch = build_batch(prompts, responses, pad_id)
    with torch.no_grad():
        logp, _ = token_logprobs_and_entropy(model, batch, with_entropy=False)
    return [logp[i][batch.response_mask[i] > 0].tolist() for i in range(len(prompts))]


def sync(model_dir: str, data: str, root: Path) -> dict:
    cfg = resolve_train_config("sync", {}, {**SETTINGS, "lr": 3.0e-2})
    trainer = LocalTrainer(cfg, data, model_dir, root / "sync")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.rl_step(0)
    prompts = trainer.data.prompt_ids[:2]
    torch.manual_seed(1)
    drawn = trainer.sampler.draw(prompts, 4, cfg.max_response_tokens, cfg.temperature)
    flat = [(p, r, lp) for p, group, logps in zip(prompts, drawn.ids, drawn.logprobs) for r, lp in zip(group, logps)]
    pad = trainer.tokenizer.pad_token_id
    after = teacher_forced(trainer.model, [p for p, _, _ in flat], [r for _, r, _ in flat], pad)
    trainer.model.load_state_dict(start)
    before = teacher_forced(trainer.model, [p for p, _, _ in flat], [r for _, r, _ in flat], pad)
    trainer.sampler.close()

    def gap(reference):
        return max(abs(a - b) for ref, (_, _, lp) in zip(reference, flat) for a, b in zip(ref, lp))

    return {"tokens": sum(len(r) for _, r, _ in flat), "lengths_match": all(len(a) == len(lp) for a, (_, _, lp) in
                                                                           zip(after, flat)),
            "gap_after_step": gap(after), "gap_to_start": gap(before), "step0": metrics}


def run(model_dir: str, data: str, work: Path, out: Path) -> dict:
    cfg = resolve_train_config("runs", {}, SETTINGS)
    LocalTrainer(cfg, data, model_dir, work).run(out, out.with_suffix(".jsonl"))
    weights = torch.load(out / WEIGHTS)
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    return {"weights": digest, "metrics": [{k: v for k, v in m.items() if k != "step_time_s"} for m in lines]}


def runs(model_dir: str, data: str, root: Path) -> dict:
    first = run(model_dir, data, root / "a", root / "a_out")
    again = run(model_dir, data, root / "b", root / "b_out")
    shutil.copytree(root / "a", root / "c")  # a run killed after step 2's checkpoint, resumed
    shutil.rmtree(root / "c" / checkpoint._folder(3))
    (root / "c" / checkpoint.LATEST).write_text(checkpoint._folder(2))
    resumed = run(model_dir, data, root / "c", root / "c_out")
    return {"first": first, "again": again, "resumed": resumed}


if __name__ == "__main__":
    model_dir, data, root, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    print(json.dumps((sync if mode == "sync" else runs)(model_dir, data, root)))
