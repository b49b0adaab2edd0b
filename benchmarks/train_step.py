"""Local-engine step cost: LUFFY vs on-policy GRPO on the same batch, and the loss alone.

LUFFY's group = GRPO's sampled responses + the teacher trace, so its extra cost should be
the teacher tokens' forward/backward only (the trace is never generated). Prints medians
over repeats; run: .venv/bin/python benchmarks/train_step.py [--prompts 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from luffy.algo.advantages import group_advantages
from luffy.algo.losses import BatchTotals, LossSettings, mixed_policy_loss
from luffy.config import TinyModelConfig, ToyTaskConfig
from luffy.data.templates import encode_prompts, encode_traces
from luffy.data.toy import make_toy_data
from luffy.data.traces import filter_traces
from luffy.models.attention import use_gqa_sdpa
from luffy.models.generation import sample
from luffy.models.sequences import (build_batch, length_buckets, pick_device, select_rows,
                                    token_logprobs_and_entropy)
from luffy.models.tiny import build_tiny_model
from luffy.models.tokenizer import load_shipped_tokenizer


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        _sync()
        began = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="group size of LUFFY (n - 1 samples + the teacher)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048,
                        help="the engine's micro_batch_tokens (padded tokens per forward)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = pick_device(args.device)

    tok = load_shipped_tokenizer()
    # the demo's architecture (random weights), on the local engine's attention
    model = use_gqa_sdpa(build_tiny_model(TinyModelConfig(), tok)).to(device)
    # the demo's training rows: the LUFFY filter (<= 128 trace tokens) over the toy traces
    toy = make_toy_data(ToyTaskConfig(n_train=2 * args.prompts, n_pretrain=1, n_eval_id=1, n_eval_ood=1), "S")
    rows, _ = filter_traces(toy.raw_traces, lambda texts: [len(ids) for ids in tok(list(texts))["input_ids"]],
                            128, "S", "toy")
    rows = rows.head(args.prompts)
    rendered, prompt_ids = encode_prompts(tok, rows["prompt"].tolist())
    traces = encode_traces(tok, rendered, [t[0]["content"] for t in rows["target"]])
    n_on = args.n - 1
    began = time.perf_counter()
    sampled = sample(model, prompt_ids, n=n_on, max_new_tokens=64, temperature=1.0, top_p=1.0,
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    rollout_s = time.perf_counter() - began

    def batch_for(with_teacher: bool):
        prompts, responses, off = [], [], []
        for p, t, group in zip(prompt_ids, traces, sampled):
            members = ([t] if with_teacher else []) + group
            for m, r in enumerate(members):
                prompts.append(p)
                responses.append(r)
                off.append(with_teacher and m == 0)
        batch = build_batch(prompts, responses, tok.pad_token_id).to(device)
        off_mask = torch.tensor(off, dtype=torch.float32, device=device).unsqueeze(-1) * batch.response_mask
        rewards = torch.randint(0, 2, (len(prompt_ids), len(members))).float()
        return batch, off_mask, group_advantages(rewards).reshape(-1).to(device)

    settings = {True: LossSettings(clip=False), False: LossSettings(clip=True)}
    results = {}
    for name, with_teacher in (("grpo", False), ("luffy", True)):
        batch, off_mask, adv = batch_for(with_teacher)
        with torch.no_grad():
            old, _ = token_logprobs_and_entropy(model, batch, with_entropy=False)

        lengths = batch.attention_mask.sum(-1).tolist()
        totals = BatchTotals.of(batch.response_mask)

        def update(micro_tokens: int) -> None:
            """The local engine's update: length-sorted micro-batches, gradient accumulation."""
            for rows in length_buckets(list(range(len(lengths))), lengths, micro_tokens):
                sub = select_rows(batch, rows)
                width = sub.response_mask.shape[1]
                logp, entropy = token_logprobs_and_entropy(model, sub)
                loss, _ = mixed_policy_loss(logp, old[rows, :width], adv[rows], sub.response_mask,
                                            off_mask[rows, :width], settings[with_teacher], entropy, totals=totals)
                loss.backward()
            model.zero_grad(set_to_none=True)

        logp, entropy = token_logprobs_and_entropy(model, batch)
        logp, entropy = logp.detach().requires_grad_(True), entropy.detach()

        def loss_only():
            loss, _ = mixed_policy_loss(logp, old, adv, batch.response_mask, off_mask, settings[with_teacher],
                                        entropy)
            loss.backward()

        results[name] = {
            "tokens": int(batch.response_mask.sum()),
            "padded": int(batch.input_ids.numel()),
            "teacher_tokens": int(off_mask.sum()),
            "update_s": median_time(lambda: update(args.micro_batch_tokens), args.repeats),
            "update_padded_s": median_time(lambda: update(0), args.repeats),
            "loss_only_s": median_time(loss_only, args.repeats),
        }
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"threads={args.threads}, prompts={args.prompts}, n={args.n}, rollout of "
          f"{args.prompts * n_on} samples: {rollout_s:.3f}s (same for both; the teacher is not generated)")
    for name, r in results.items():
        print(f"{name:5s}: response tokens {r['tokens']:6d} (teacher {r['teacher_tokens']:5d})  "
              f"forward+backward+loss: micro-batched {r['update_s'] * 1000:7.1f} ms, one padded batch of "
              f"{r['padded']} tokens {r['update_padded_s'] * 1000:7.1f} ms;  loss alone {r['loss_only_s'] * 1000:5.2f} ms")
    g, l = results["grpo"], results["luffy"]
    print(f"luffy/grpo: {l['tokens'] / g['tokens']:.2f}x response tokens; update time {l['update_s'] / g['update_s']:.2f}x "
          f"micro-batched, {l['update_padded_s'] / g['update_padded_s']:.2f}x as one padded batch "
          f"({l['padded'] / g['padded']:.2f}x padded tokens); the loss alone is "
          f"{100 * l['loss_only_s'] / l['update_s']:.1f}% of LUFFY's update")
    print(f"luffy/grpo step (the rollout + the micro-batched update): "
          f"{(rollout_s + l['update_s']) / (rollout_s + g['update_s']):.2f}x")


if __name__ == "__main__":
    main()
