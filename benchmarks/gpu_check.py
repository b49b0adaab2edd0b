"""GPU check: what a machine with torch and transformers (no vLLM, no Ray, no verl) can run of
the training path, on CUDA, with figures.

1. The verl engine's loss on micro-batches (``luffy.engines.verl.loss.micro_batch_loss``, the
   verl-free core of the installed closure) against ``mixed_policy_loss`` on the whole
   mini-batch: loss and gradient differences, tokens/s of the micro-batched update and peak
   memory, on a random Qwen2 model of the given size.
2. The local engine's LUFFY step (rollout, grading, old log-probs, updates) on the demo's tiny
   model and toy task: seconds per step, response tokens/s and peak memory.

    python benchmarks/gpu_check.py [--device cuda] [--hidden 1024 --layers 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from luffy.algo.losses import BatchTotals, LossSettings, mixed_policy_loss
from luffy.engines.verl.loss import MicroBatch, micro_batch_loss
from luffy.models.sequences import build_batch, length_buckets, pick_device, select_rows, token_logprobs_and_entropy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def loss_check(args, device: torch.device) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=4096, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                         intermediate_size=args.hidden * 3, max_position_embeddings=4096, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device)
    g = torch.Generator().manual_seed(0)
    rows = args.prompts * args.n
    prompts = [torch.randint(0, 4096, (int(torch.randint(32, 128, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    responses = [torch.randint(0, 4096, (int(torch.randint(16, args.max_response, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(rows)]
    batch = build_batch([prompts[r // args.n] for r in range(rows)], responses, 0).to(device)
    with torch.no_grad():
        old, _ = token_logprobs_and_entropy(model, batch, with_entropy=False)
    off = torch.zeros_like(batch.response_mask)
    off[:: args.n] = batch.response_mask[:: args.n]  # the first member of each group is the teacher's
    advantages = torch.randn(rows, generator=g).to(device)
    settings = LossSettings(loss_agg="constant", loss_constant=float(args.max_response))

    def whole() -> torch.Tensor:
        logp, entropy = token_logprobs_and_entropy(model, batch)
        loss, _ = mixed_policy_loss(logp, old, advantages, batch.response_mask, off, settings, entropy)
        loss.backward()
        return loss.detach()

    def micro() -> torch.Tensor:
        totals = BatchTotals.of(batch.response_mask)
        total = torch.zeros((), device=device)
        lengths = batch.attention_mask.sum(-1).tolist()
        for part in length_buckets(list(range(rows)), lengths, args.micro_batch_tokens):
            sub = select_rows(batch, part)
            width = sub.response_mask.shape[1]
            logp, entropy = token_logprobs_and_entropy(model, sub)
            mb = MicroBatch(logp, entropy, sub.response_mask, old[part, :width], advantages[part], off[part, :width])
            loss, _ = micro_batch_loss(mb, settings, totals, dp_size=1)
            loss.backward()
            total += loss.detach()
        return total

    reference = whole()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _reset_peak(device)
    _sync(device)
    began = time.perf_counter()
    value = micro()
    _sync(device)
    seconds = time.perf_counter() - began
    grad_diff = max(float((p.grad - e).abs().max()) for p, e in zip(model.parameters(), expected))
    scale = max(float(e.abs().max()) for e in expected)
    tokens = int(batch.response_mask.sum())
    print(f"[loss] {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter Qwen2, {rows} sequences, "
          f"{tokens} response tokens, micro-batches of <= {args.micro_batch_tokens} padded tokens")
    print(f"[loss] micro-batched vs whole batch: loss {float(value):.6f} vs {float(reference):.6f}, "
          f"max |grad diff| {grad_diff:.2e} (max |grad| {scale:.2e})")
    print(f"[loss] update (forward + backward): {seconds:.3f} s, {tokens / seconds:,.0f} response tokens/s, "
          f"peak memory {_peak_mb(device):,.0f} MiB")


def local_step_check(args, device: torch.device) -> None:
    from common import toy_model_and_data
    from luffy.config import resolve_train_config
    from luffy.engines.local.trainer import LocalTrainer

    with tempfile.TemporaryDirectory() as tmp:
        toy_model_and_data(Path(tmp))  # the demo's architecture, random weights; the toy rows
        cfg = resolve_train_config("luffy", {}, {"algorithm": "luffy", "steps": args.steps, "prompts_per_step": 64,
                                                 "n": 8, "max_response_tokens": 128, "lr": 1.0e-4,
                                                 "micro_batch_tokens": 131072, "device": device.type})
        trainer = LocalTrainer(cfg, str(Path(tmp) / "train.parquet"), str(Path(tmp) / "model"), Path(tmp) / "work")
        trainer.rl_step(0)  # warm-up
        _reset_peak(device)
        times, tokens = [], []
        for step in range(1, args.steps + 1):
            _sync(device)
            began = time.perf_counter()
            metrics = trainer.rl_step(step)
            _sync(device)
            times.append(time.perf_counter() - began)
            tokens.append(64 * (7 * metrics["response_length/on_policy"] + metrics["response_length/off_policy"]))
        per_step = sum(times) / len(times)
        print(f"[local] LUFFY step, tiny model, 64 prompts x 8: {per_step:.3f} s/step, "
              f"{sum(tokens) / sum(times):,.0f} response tokens/s, peak memory {_peak_mb(device):,.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-response", type=int, default=1024)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}")
    loss_check(args, device)
    local_step_check(args, device)


if __name__ == "__main__":
    main()
