"""Teacher log-probs of the training traces: ``log pi_phi(tau_t)`` per trace token.

LUFFY's off-policy weight is ``f(pi_theta / pi_phi)``; the paper takes ``pi_phi = 1`` because
the released traces carry no probabilities. When the teacher is available (and shares the
policy's tokenizer), scoring each trace once under it gives the true ratio
(``teacher_logprobs: true``). The log-probs are teacher-forced on exactly the token sequence
the trainer builds: the policy's chat template for the prompt, then the trace and EOS.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from luffy.data.schema import TEACHER_LOGPROBS, DataError, luffy_fields, read_luffy
from luffy.data.templates import encode_prompts, encode_traces
from luffy.io import write_parquet
from luffy.models.sequences import build_batch, length_buckets, pick_device, token_logprobs_and_entropy

log = logging.getLogger(__name__)


def trace_logprobs(model: torch.nn.Module, prompt_ids: list[list[int]], trace_ids: list[list[int]], pad_id: int,
                   micro_batch_tokens: int = 8192) -> list[list[float]]:
    """Teacher-forced log-probs of each trace's tokens (EOS included) after its prompt, in
    length-sorted micro-batches built one at a time (never the whole padded data set)."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(t) for p, t in zip(prompt_ids, trace_ids)]
    out: list[list[float]] = [[] for _ in trace_ids]
    model.eval()
    with torch.no_grad():
        for micro in tqdm(length_buckets(list(range(len(lengths))), lengths, micro_batch_tokens),
                          desc="score traces", mininterval=5.0):
            sub = build_batch([prompt_ids[r] for r in micro], [trace_ids[r] for r in micro], pad_id).to(device)
            logp, _ = token_logprobs_and_entropy(model, sub, with_entropy=False)
            for row, r in enumerate(micro):
                out[r] = logp[row][sub.response_mask[row].bool()].tolist()
    return out


def encode_frame(tokenizer, frame) -> tuple[list[list[int]], list[list[int]]]:
    """A LUFFY frame's prompts (rendered with ``tokenizer``'s chat template) and traces (EOS
    included) as token ids: the sequences the trainer builds."""
    prompts, traces, _ = luffy_fields(frame)
    rendered, prompt_ids = encode_prompts(tokenizer, prompts)
    return prompt_ids, encode_traces(tokenizer, rendered, traces)


def score_traces(teacher: str, policy_tokenizer: str, data: str, out: str, micro_batch_tokens: int = 8192,
                 device: str = "auto") -> int:
    """Write ``data`` with a ``teacher_logprobs`` column computed by ``teacher``; returns rows."""
    from luffy.models import TOKENIZER_FILES, model_source

    tokenizer = AutoTokenizer.from_pretrained(model_source(policy_tokenizer, "policy tokenizer", TOKENIZER_FILES))
    teacher = model_source(teacher, "teacher")
    teacher_vocab = AutoTokenizer.from_pretrained(teacher).get_vocab()
    if teacher_vocab != tokenizer.get_vocab():
        raise DataError(f"teacher {teacher} and policy tokenizer {policy_tokenizer} differ in vocabulary; "
                        "per-token teacher log-probs need the policy's tokenization")
    frame = read_luffy(data)
    prompt_ids, trace_ids = encode_frame(tokenizer, frame)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype="auto").to(pick_device(device))
    scores = trace_logprobs(model, prompt_ids, trace_ids, tokenizer.pad_token_id, micro_batch_tokens)
    frame[TEACHER_LOGPROBS] = scores
    write_parquet(out, frame)
    log.info("scored %d traces (%d tokens) with %s -> %s", len(scores), sum(map(len, scores)), teacher, out)
    return len(scores)


def teacher_token_probability(model_path: str, data: str, traces: int, micro_batch_tokens: int = 8192,
                              device: str = "auto") -> dict[str, float]:
    """How probable the teacher's tokens are under a model: the first ``traces`` training traces
    teacher-forced after their prompts (the tokens the trainer builds, EOS included). Returns
    the token-mean probability (LUFFY's ``off_policy/prob_mean`` before any update), its
    median, the share of tokens below 0.1 and the mean per-token log-probability."""
    import math
    import statistics

    from luffy.models import model_source

    model_path = model_source(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    frame = read_luffy(data).head(traces)
    prompt_ids, trace_ids = encode_frame(tokenizer, frame)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(pick_device(device))
    logps = [lp for row in trace_logprobs(model, prompt_ids, trace_ids, tokenizer.pad_token_id, micro_batch_tokens)
             for lp in row]
    probs = [math.exp(lp) for lp in logps]
    return {"traces": float(len(frame)), "tokens": float(len(probs)), "token_prob_mean": statistics.fmean(probs),
            "token_prob_median": statistics.median(probs), "share_below_0.1": sum(p < 0.1 for p in probs) / len(probs),
            "logprob_mean": statistics.fmean(logps)}
