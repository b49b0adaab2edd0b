"""The local engine: one process, torch + transformers, rollouts by ``luffy.models.generation``
(each prompt prefilled once, its KV cache shared by its samples) or by vLLM in the same process
(``rollout: vllm``, ``luffy.engines.local.rollout``).

Per step (luffy / grpo): draw ``prompts_per_step`` prompts; for each, ``n - n_off`` sampled
responses plus ``n_off`` copies of the teacher trace (+EOS); grade all with the reward;
compute group advantages over the mixed group; record pi_old (the first update's own forward
for its rows, a no-grad forward for the others); with vLLM rollouts, weight each on-policy
token by min(pi_old / pi_vllm, rollout_is_cap); then ``ppo_epochs`` passes of
``mini_batches`` optimizer updates on ``luffy.algo``'s loss.
``sft`` minimises the NLL of the traces instead. The math lives in ``luffy.algo`` only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from luffy.algo import metrics as names
from luffy.algo.advantages import group_advantages, informative_groups
from luffy.algo.groups import (off_policy_mask, plan_teacher_members, sampled_logprob_layout, teacher_logprob_layout,
                               training_progress)
from luffy.algo.losses import (BatchTotals, LossSettings, masked_mean, mixed_policy_loss, rollout_correction, sft_loss,
                               sft_loss_term)
from luffy.algo.metrics import combine_micro_batches, mean, mean_over_updates, rollout_metrics
from luffy.chain import Deadline, TimeLimitReached
from luffy.config import TrainConfig, to_dict
from luffy.data.schema import load_benchmark
from luffy.data.templates import encode_prompts
from luffy.data.training import load_train_data
from luffy.engines.base import MetricsSink, write_manifest
from luffy.engines.local import checkpoint
from luffy.engines.local.rollout import HFSampler, VllmSampler
from luffy import io
from luffy.io import atomic_dir, atomic_path, write_text
from luffy.models.attention import use_gqa_sdpa
from luffy.models.sequences import (SequenceBatch, autocast_for, build_batch, length_buckets, pick_device,
                                    select_rows, token_logprobs_and_entropy)
from luffy.reward.math import Grade, grade
from luffy.reward.pool import GraderPool
from luffy.seeding import derived_seed

log = logging.getLogger(__name__)
WEIGHTS = "model.pt"


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, total: int) -> tuple[int, ...]:
    order = list(range(total))
    random.Random(derived_seed(seed, epoch)).shuffle(order)
    return tuple(order)


def _in_precision(method):
    """Run a step's rollouts, forwards and backwards under the trainer's ``autocast``."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with self.autocast():
            return method(self, *args, **kwargs)
    return wrapped


def prompt_indices(step: int, per_step: int, total: int, seed: int) -> list[int]:
    """The prompts of ``step``: consecutive slices of per-epoch seeded permutations.

    Stateless in the step number, so a resumed run draws exactly the same prompts.
    """
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, total)
        out.append(_epoch_order(seed, epoch, total)[pos])
    return out


class LocalTrainer:
    def __init__(self, cfg: TrainConfig, data_path: str, base_model: str, work_dir: Path,
                 sink: MetricsSink | None = None, validation: dict[str, Any] | None = None,
                 grader_workers: int = 0, deadline: Deadline | None = None, pool: GraderPool | None = None):
        self.cfg = cfg
        self.validation = validation
        self.deadline = deadline  # a chained SLURM job's end: stop at a checkpoint before it
        # rewards are graded in a process pool during run(): ``pool`` (started by the caller before
        # this loads the model, so its workers boot meanwhile), else one of ``grader_workers``
        # workers of run()'s own (0: in-process)
        self.pool = pool
        self.grader_workers = grader_workers
        self.grader: GraderPool | None = None
        self.device = pick_device(cfg.device)
        self.autocast = autocast_for(self.device)  # a GPU: bfloat16 autocast and TF32; the CPU: float32
        self.base_model = base_model
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.sink = sink
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        self.model = use_gqa_sdpa(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)).to(self.device)
        # pi_old of a step's first update can come from that update's own forward (``_policy_updates``)
        self.own_old = without_dropout(self.model)
        self.data = load_train_data(data_path, self.tokenizer, cfg.data_start, cfg.data_end, cfg.teacher_logprobs)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           weight_decay=cfg.weight_decay)
        updates_per_step = cfg.mini_batches * (cfg.ppo_epochs if cfg.algorithm != "sft" else 1)
        warmup = cfg.warmup_steps * updates_per_step
        # (u + 1): the first update already has a positive learning rate (the reference's first
        # step ran at lr 0).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: min(1.0, (u + 1) / warmup) if warmup else 1.0)
        self.loss_settings = LossSettings.of(cfg)
        self.metrics_path = work_dir / "metrics.jsonl"
        # The KL penalty's reference: a frozen copy of the starting weights (only when used).
        self.ref_model = None
        if cfg.algorithm != "sft" and cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.valid_prompts: list[list[int]] = []
        self.valid_answers: list[str] = []
        if validation:
            problems = load_benchmark(validation["data"])
            if validation.get("max_problems"):
                problems = problems.iloc[: validation["max_problems"]]
            _, self.valid_prompts = encode_prompts(self.tokenizer, problems["prompt"].tolist())
            self.valid_answers = problems["ground_truth"].tolist()
        self.sampler = self._make_sampler()

    def _make_sampler(self) -> HFSampler | VllmSampler:
        """The rollouts' sampler (``rollout``): the trainer's own model, or vLLM in this process
        with a context for the longest prompt + ``max_response_tokens``."""
        cfg, tok = self.cfg, self.tokenizer
        if cfg.rollout != "vllm":
            return HFSampler(self.model, tok.eos_token_id, tok.pad_token_id)
        longest = max(len(p) for p in [*self.data.prompt_ids, *self.valid_prompts])
        sequences = cfg.prompts_per_step * cfg.n
        if self.validation:
            sequences = max(sequences, len(self.valid_prompts) * self.validation["n"])
        return VllmSampler(self.model, self.base_model, longest + cfg.max_response_tokens, cfg.rollout_memory,
                           sequences, cfg.seed)

    # ---- one step ----
    def _update(self, batch: SequenceBatch, rows: list[int], old_logp, advantages, off_mask, ref_logp,
                teacher_logp, trace_batch: SequenceBatch | None, fill_old: bool = False,
                rollout_logp: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer update on the mini-batch ``rows`` of ``batch``.

        The rows are processed in length-sorted micro-batches (``micro_batch_tokens``) whose
        losses are normalised by the mini-batch's totals, so the accumulated gradient is the
        mini-batch's and padding stays near each micro-batch's own length. ``fill_old``: the
        step's first update, before which the policy is still pi_old: each micro-batch's own
        log-probs (detached) are its rows' pi_old, written into ``old_logp``. ``rollout_logp``:
        the sampler's log-probs (vLLM rollouts), for the importance correction of on-policy tokens.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals = BatchTotals.of(batch.response_mask[rows])
        parts: list[tuple[float, dict[str, float]]] = []
        for micro in length_buckets(rows, batch.attention_mask.sum(-1).tolist(), self.cfg.micro_batch_tokens):
            sub = select_rows(batch, micro)
            width = sub.response_mask.shape[1]
            logp, entropy = token_logprobs_and_entropy(self.model, sub,
                                                       entropy_grad=self.loss_settings.entropy_coef > 0)
            if fill_old:
                old_logp[micro, :width] = logp.detach()
            weight, corrected = None, {}
            if rollout_logp is not None:
                weight, corrected = rollout_correction(old_logp[micro, :width], rollout_logp[micro, :width],
                                                       sub.response_mask * (1.0 - off_mask[micro, :width]),
                                                       self.cfg.rollout_is_cap)
            loss, metrics = mixed_policy_loss(
                logp, old_logp[micro, :width], advantages[micro], sub.response_mask, off_mask[micro, :width],
                self.loss_settings, entropy, ref_log_prob=None if ref_logp is None else ref_logp[micro, :width],
                teacher_log_prob=None if teacher_logp is None else teacher_logp[micro, :width], totals=totals,
                rollout_weight=weight)
            loss.backward()
            parts.append((float(sub.response_mask.sum()), {**metrics, **corrected}))
        metrics = combine_micro_batches(parts)
        if trace_batch is not None:  # rl_sft: + sft_coef x NLL of the same prompts' teacher traces
            trace_logp, _ = token_logprobs_and_entropy(self.model, trace_batch, with_entropy=False)
            term, nll = sft_loss_term(trace_logp, trace_batch.response_mask, self.cfg.sft_coef)
            term.backward()
            metrics[names.LOSS_SFT] = nll.item()
            metrics[names.LOSS_TOTAL] += term.item()
        metrics[names.GRAD_NORM] = self._optimizer_step()
        return metrics

    def _optimizer_step(self) -> float:
        """Clip the gradient norm, step the optimizer and the schedule; returns the norm before clipping."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.sampler.weights_changed()
        return grad_norm

    @_in_precision
    def rl_step(self, step: int) -> dict[str, float]:
        cfg, tok = self.cfg, self.tokenizer
        idx = prompt_indices(step, cfg.prompts_per_step, len(self.data.prompt_ids), cfg.seed)
        n_on = cfg.n - cfg.n_off
        torch.manual_seed(derived_seed(cfg.seed, step))
        drawn = self.sampler.draw([self.data.prompt_ids[i] for i in idx], n_on, cfg.max_response_tokens,
                                  cfg.temperature) if n_on else None
        sampled = drawn.ids if drawn else [[] for _ in idx]
        sampled_logp = drawn.logprobs if drawn and drawn.logprobs is not None else [[None] * n_on for _ in idx]
        guided = self._off_policy_members(idx, step)
        prompts, responses, off_flags, off_tokens, golds, rollout_logps = [], [], [], [], [], []
        for i, teacher, group, group_logp in zip(idx, guided, sampled, sampled_logp):
            members = teacher + [(response, 0, logp) for response, logp in zip(group, group_logp)]
            for m, (response, n_off_tokens, logp) in enumerate(members):
                prompts.append(self.data.prompt_ids[i])
                responses.append(response)
                off_flags.append(m < cfg.n_off)
                off_tokens.append(n_off_tokens)
                golds.append(self.data.answers[i])
                rollout_logps.append(logp)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        grades = self._grade(texts, golds)
        rewards = torch.tensor([g.reward for g in grades]).view(len(idx), cfg.n)
        on_policy_members = ~torch.tensor(off_flags).view(len(idx), cfg.n)
        advantages = group_advantages(rewards, cfg.std_normalize, baseline_mask=(
            on_policy_members if cfg.advantage_baseline == "on_policy" else None)).reshape(-1)
        keep = informative_groups(rewards) if cfg.filter_groups else torch.ones(len(idx), dtype=torch.bool)
        rows = [g * cfg.n + m for g in range(len(idx)) if keep[g] for m in range(cfg.n)]
        per_update = []
        if rows:
            per_update = self._policy_updates([prompts[r] for r in rows], [responses[r] for r in rows],
                                              [off_tokens[r] for r in rows], advantages[rows],
                                              [idx[r // cfg.n] for r in rows],
                                              [rollout_logps[r] for r in rows] if self.sampler.name == "vllm"
                                              else None)
        metrics = mean_over_updates(per_update)
        metrics.update(rollout_metrics(
            _groups([g.reward for g in grades], cfg.n), _groups(off_flags, cfg.n),
            _groups([len(r) for r in responses], cfg.n), _groups([g.reason == "no_think_end" for g in grades], cfg.n),
            kept=keep.tolist()))
        return metrics

    def _off_policy_members(self, idx: list[int], step: int) -> list[list[tuple[list[int], int, list | None]]]:
        """Per prompt, its n_off teacher members as (response ids, number of off-policy tokens,
        the sampler's log-probs of the rest: [] for a whole trace; None for a continuation the
        hf sampler drew).

        Ratio 1 gives the whole trace + EOS; a smaller ratio gives the trace's prefix followed by
        the policy's own continuation, of which only the prefix is off-policy.
        """
        cfg = self.cfg
        rng = random.Random(derived_seed(cfg.seed, step))
        progress = training_progress(step, cfg.steps)
        members: list[list[tuple[list[int], int, list | None]]] = [[] for _ in idx]
        pending = []  # (group, prompt + prefix, prefix length) needing a continuation
        for g, i in enumerate(idx):
            trace = self.data.trace_ids[i]
            for k in plan_teacher_members(len(trace), cfg.n_off, cfg.prefix_strategy, cfg.prefix_ratio_min,
                                          cfg.prefix_ratio_max, rng, progress):
                if k is None:
                    members[g].append((trace, len(trace), []))
                else:
                    pending.append((g, self.data.prompt_ids[i] + trace[:k], k))
        if pending:
            drawn = self.sampler.draw([p for _, p, _ in pending], 1,
                                      cfg.max_response_tokens - min(k for _, _, k in pending), cfg.temperature)
            logps = drawn.logprobs or [[None] for _ in pending]
            for (g, with_prefix, k), (continuation,), (logp,) in zip(pending, drawn.ids, logps):
                prefix = with_prefix[len(with_prefix) - k:] if k else []
                keep = cfg.max_response_tokens - k
                members[g].append((prefix + continuation[:keep], k, None if logp is None else logp[:keep]))
        return members

    def _policy_updates(self, prompts, responses, off_tokens, advantages, sources,
                        rollout_logps=None) -> list[dict[str, float]]:
        """pi_old (and pi_ref) by no-grad forwards, then ppo_epochs x mini-batch updates.

        ``off_tokens[j]``: how many leading tokens of response j are the teacher's;
        ``sources[j]``: the training row response j answers; ``rollout_logps[j]``: the
        sampler's log-probs of its sampled tokens (vLLM rollouts; None: the trainer's own
        sampler). Before the first update the policy
        is pi_old: when its training forward equals its no-grad one (no dropout), the first
        mini-batch's pi_old comes from that update's own forward, and the no-grad pass runs
        only over the other mini-batches' rows (none with one mini-batch and one epoch).
        """
        cfg = self.cfg
        batch = build_batch(prompts, responses, self.tokenizer.pad_token_id).to(self.device)
        off_mask = off_policy_mask(batch.response_mask, torch.tensor(off_tokens, device=self.device))
        teacher_logp = teacher_logprob_layout(batch.response_mask, off_tokens,
                                              [self.data.teacher_logp[s] for s in sources]) if cfg.teacher_logprobs \
            else None
        advantages = advantages.to(self.device)
        rollout_logp = None if rollout_logps is None else sampled_logprob_layout(batch.response_mask, off_tokens,
                                                                                 rollout_logps)
        members_per_mb = cfg.n * (cfg.prompts_per_step // cfg.mini_batches)
        minis = [list(range(s, min(s + members_per_mb, len(responses))))
                 for s in range(0, len(responses), members_per_mb)]
        old_logp = torch.zeros_like(batch.response_mask)
        with torch.no_grad():
            self.model.eval()
            passed = minis[1:] if self.own_old else minis  # the first mini-batch's pi_old: its own update's
            self._logprobs(self.model, batch, [r for rows in passed for r in rows], old_logp)
            ref_logp = None if self.ref_model is None else self._logprobs(self.ref_model, batch)
        per_update = []
        for epoch in range(cfg.ppo_epochs):
            for m, rows in enumerate(minis):
                trace_batch = self._trace_batch([sources[r] for r in rows]) if cfg.algorithm == "rl_sft" else None
                per_update.append(self._update(batch, rows, old_logp, advantages, off_mask, ref_logp, teacher_logp,
                                               trace_batch, fill_old=self.own_old and epoch == 0 and m == 0,
                                               rollout_logp=rollout_logp))
        return per_update

    def _logprobs(self, model, batch: SequenceBatch, rows: list[int] | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log-probs of ``rows`` (default: every row), [B, L-1], computed in
        length-sorted micro-batches, written into ``out`` (default: a new zero tensor)."""
        out = torch.zeros_like(batch.response_mask) if out is None else out
        lengths = batch.attention_mask.sum(-1).tolist()
        rows = list(range(len(lengths))) if rows is None else rows
        for micro in length_buckets(rows, lengths, self.cfg.micro_batch_tokens) if rows else []:
            sub = select_rows(batch, micro)
            logp, _ = token_logprobs_and_entropy(model, sub, with_entropy=False)
            out[micro, : logp.shape[1]] = logp
        return out

    def _trace_batch(self, sources: list[int]) -> SequenceBatch:
        """The teacher traces (+EOS) of the distinct training rows in ``sources``."""
        rows = list(dict.fromkeys(sources))
        return build_batch([self.data.prompt_ids[i] for i in rows], [self.data.trace_ids[i] for i in rows],
                           self.tokenizer.pad_token_id).to(self.device)

    @_in_precision
    def sft_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        idx = prompt_indices(step, cfg.prompts_per_step, len(self.data.prompt_ids), cfg.seed)
        per_update = []
        per_mb = cfg.prompts_per_step // cfg.mini_batches
        for start in range(0, len(idx), per_mb):
            chunk = idx[start : start + per_mb]
            batch = build_batch([self.data.prompt_ids[i] for i in chunk], [self.data.trace_ids[i] for i in chunk],
                                self.tokenizer.pad_token_id).to(self.device)
            self.model.train()
            logp, entropy = token_logprobs_and_entropy(self.model, batch, entropy_grad=False)  # a metric only
            loss = sft_loss(logp, batch.response_mask, "token_mean")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            per_update.append({names.LOSS_SFT: loss.item(), names.GRAD_NORM: self._optimizer_step(),
                               names.ENTROPY: masked_mean(entropy, batch.response_mask).item()})
        metrics = mean_over_updates(per_update)
        metrics[names.LENGTH_OFF_POLICY] = mean(len(self.data.trace_ids[i]) for i in idx)
        return metrics

    def _grade(self, texts: list[str], golds: list[str]) -> list[Grade]:
        """The reward's verdicts: in the grader pool when one is running, else in this process."""
        if self.grader is None:
            return [grade(t, g) for t, g in zip(texts, golds)]
        return [v["math_verify"] for v in self.grader.grade(texts, golds, ("math_verify",))]

    # ---- validation on the held-out training problems ----
    @_in_precision
    def validate(self) -> float:
        """Accuracy (mean over ``n`` samples of each held-out problem) of the current policy."""
        v, tok = self.validation, self.tokenizer
        torch.manual_seed(derived_seed(self.cfg.seed, 777))  # the same draws at every validation
        samples = self.sampler.draw(self.valid_prompts, v["n"], self.cfg.max_response_tokens, v["temperature"]).ids
        texts = [tok.batch_decode(group, skip_special_tokens=True) for group in samples]
        flat = [(t, gold) for group, gold in zip(texts, self.valid_answers) for t in group]
        scores = [g.reward for g in self._grade([t for t, _ in flat], [gold for _, gold in flat])]
        return mean(scores)

    def _track_best(self, step: int, accuracy: float) -> None:
        """Keep the weights of the best validation accuracy so far (``select: best``)."""
        best = self.work_dir / "best.json"
        previous = json.loads(best.read_text())["accuracy"] if best.exists() else -1.0
        if accuracy > previous:
            with atomic_path(self.work_dir / "best.pt", suffix=".pt") as tmp:
                torch.save(self.model.state_dict(), tmp)
            write_text(best, json.dumps({"step": step + 1, "accuracy": accuracy}))

    # ---- the loop ----
    def run(self, out_dir: Path, metrics_out: Path, resume_run_id: Callable[[], str | None] | None = None) -> None:
        own = self.pool is None and self.grader_workers > 0
        with GraderPool(workers=self.grader_workers) if own else contextlib.nullcontext(self.pool) as pool:
            self.grader = pool
            try:
                self._run(out_dir, metrics_out, resume_run_id)
            finally:
                self.grader = None
                self.sampler.close()

    def _run(self, out_dir: Path, metrics_out: Path, resume_run_id: Callable[[], str | None] | None) -> None:
        cfg = self.cfg
        resumed = checkpoint.load_latest(self.work_dir, self.model, self.optimizer, self.scheduler)
        start = resumed.step if resumed else 0
        if resumed:
            log.info("resuming from %s at step %d", self.work_dir, start)
        # the steps after the checkpoint (or all, without one) run again: drop their old lines
        io.truncate_jsonl(self.metrics_path, lambda record: record["step"] < start)
        step_fn = self.sft_step if cfg.algorithm == "sft" else self.rl_step
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train[{cfg.algorithm}]",
                   mininterval=5.0)
        longest_step_s = checkpoint_s = 0.0
        if self.grader is not None:  # what is left of its workers' start-up is no step's time
            self.grader.ready()
        for step in bar:
            began = time.perf_counter()
            metrics = step_fn(step)
            metrics[names.LR] = self.scheduler.get_last_lr()[0]
            metrics[names.STEP_TIME] = time.perf_counter() - began
            if self.validation and ((step + 1) % self.validation["every"] == 0 or step + 1 == cfg.steps):
                metrics[names.VAL_ACCURACY] = self.validate()
                if self.validation["select"] == "best":
                    self._track_best(step, metrics[names.VAL_ACCURACY])
            io.append_jsonl(self.metrics_path, {"step": step, **metrics})
            if self.sink:
                self.sink(metrics, step)
            bar.set_postfix({k: round(v, 3) for k, v in metrics.items()
                             if k in (names.REWARD_ON_POLICY, names.LOSS_TOTAL, names.LOSS_SFT)})
            longest_step_s = max(longest_step_s, time.perf_counter() - began)
            due = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
            stop = (self.deadline is not None and step + 1 < cfg.steps
                    and self.deadline.stop_before_next(longest_step_s, checkpoint_s))
            if due or stop:
                saving = time.perf_counter()
                checkpoint.save(self.work_dir, step + 1, self.model, self.optimizer, self.scheduler,
                                {"run_id": resume_run_id() if resume_run_id else None}, keep=cfg.keep_checkpoints)
                checkpoint_s = max(checkpoint_s, time.perf_counter() - saving)
            if stop:
                raise TimeLimitReached(step + 1, cfg.steps, self.deadline.end)
        self._write_final(out_dir, metrics_out)

    def _write_final(self, out_dir: Path, metrics_out: Path) -> None:
        """The exported weights: the last step's, or with ``select: best`` the best validated."""
        selected = {"step": self.cfg.steps, "rule": "last"}
        state = self.model.state_dict()
        if self.validation and self.validation["select"] == "best" and (self.work_dir / "best.json").exists():
            selected = {**json.loads((self.work_dir / "best.json").read_text()), "rule": "best validation accuracy"}
            state = torch.load(self.work_dir / "best.pt", map_location="cpu")
        log.info("exporting the weights of step %d (%s)", selected["step"], selected["rule"])
        with atomic_dir(out_dir) as tmp:
            torch.save(state, tmp / WEIGHTS)
            write_manifest(tmp, engine="local", base_model=self.base_model, steps=self.cfg.steps, selected=selected,
                           settings=to_dict(self.cfg), weights=WEIGHTS)
        with atomic_path(metrics_out) as tmp:
            shutil.copyfile(self.metrics_path, tmp)



def without_dropout(model: torch.nn.Module) -> bool:
    """Whether the model's forward in training mode equals its forward in eval mode: no dropout
    module with p > 0 and no attention dropout in its config."""
    config = getattr(model, "config", None)
    if any(float(getattr(config, key, 0.0) or 0.0) > 0 for key in ("attention_dropout", "hidden_dropout",
                                                                    "resid_pdrop", "embd_pdrop", "attn_pdrop")):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _groups(values: list, n: int) -> list[list]:
    """A flat list of members, group after group of ``n``, as one list per group."""
    return [values[start : start + n] for start in range(0, len(values), n)]
