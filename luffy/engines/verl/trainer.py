"""verl's synchronous V1 PPO trainer plus what LUFFY needs, registered as ``trainer.v1.trainer_mode=luffy``.

- after the workers exist, our loss replaces verl's (``set_loss_fn``);
- rl_sft: the group's advantages come from ``luffy.algo.advantages`` with the on-policy
  members as the baseline (the trace row is outside it), and each row learns its mini-batch's
  totals for the SFT term (``minibatch_totals``);
- every step, our metric names (``luffy.algo.metrics``) join verl's in the metrics verl logs
  (console, the experiment's MLflow ``train`` run), and one JSON line per step goes to
  ``luffy.metrics_path`` (a resumed run first drops the lines after its checkpoint).

The pure parts (grouping rows, mini-batch membership, the step's metrics) are functions of
plain lists, tested on the CPU; the rest moves data between verl's TransferQueue and them.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.checkpoint.checkpoint_manager import should_save_ckpt_esi
from verl.workers.utils.padding import response_to_nested

from luffy import io
from luffy.algo import metrics as names
from luffy.algo.advantages import group_advantages
from luffy.algo.metrics import rollout_metrics
from luffy.engines.verl.loss import MINIBATCH_TOTALS, OFF_POLICY_MASK, SFT_MASK, luffy_loss
from luffy.engines.verl.overrides import TIME_UP_FILE, TRAINER_MODE
from luffy.tracking import OnceLogger, logged_through

STEP_KEY = "training/global_step"  # logged by verl at every step
RENAMED = {"actor/grad_norm": names.GRAD_NORM, "actor/lr": names.LR, "timing_s/step": names.STEP_TIME}


def groups_by_uid(uids: Sequence[str]) -> list[list[int]]:
    """Row positions per group (uid), groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, uid in enumerate(uids):
        groups.setdefault(str(uid), []).append(row)
    return list(groups.values())


def minibatch_of_rows(rows: int, dp_size: int, minibatch_rows: int) -> list[int]:
    """Which global mini-batch each row of a step's batch lands in, the way verl 0.9.1 splits:
    the batch is cut into ``dp_size`` contiguous parts (one per rank), and each rank walks its
    part in contiguous mini-batches of ``minibatch_rows / dp_size`` rows (no shuffling).
    The loss checks the result against verl's own token count."""
    per_rank, per_minibatch = rows // dp_size, minibatch_rows // dp_size
    if rows % dp_size or minibatch_rows % dp_size or per_rank % per_minibatch:
        raise ValueError(f"{rows} rows do not split into {dp_size} ranks x mini-batches of {minibatch_rows}")
    return [(row % per_rank) // per_minibatch for row in range(rows)]


def minibatch_totals(minibatch: Sequence[int], policy_tokens: Sequence[int], trace_tokens: Sequence[int]
                     ) -> list[list[float]]:
    """Per row, its mini-batch's (policy tokens, non-empty policy sequences, trace tokens)."""
    totals: dict[int, list[float]] = {}
    for mb, policy, trace in zip(minibatch, policy_tokens, trace_tokens):
        entry = totals.setdefault(mb, [0.0, 0.0, 0.0])
        entry[0] += policy
        entry[1] += float(policy > 0)
        entry[2] += trace
    return [list(totals[mb]) for mb in minibatch]


def split_baseline_advantages(uids: Sequence[str], rewards: Sequence[float], in_baseline: Sequence[bool],
                              std_normalize: bool) -> list[float]:
    """Group advantages with the baseline over the ``in_baseline`` members of each group (every
    member gets an advantage); groups without such a member get 0."""
    out = [0.0] * len(rewards)
    for rows in groups_by_uid(uids):
        mask = torch.tensor([[bool(in_baseline[r]) for r in rows]])
        if not bool(mask.any()):
            continue
        values = group_advantages(torch.tensor([[float(rewards[r]) for r in rows]]), std_normalize,
                                  baseline_mask=mask)[0]
        for r, value in zip(rows, values.tolist()):
            out[r] = value
    return out


def step_metrics(uids: Sequence[str], rewards: Sequence[float], teacher: Sequence[bool], lengths: Sequence[int],
                 no_think_end: Sequence[bool]) -> dict[str, float]:
    """The rollout metrics of ``luffy.algo.metrics`` from a step's rows (trace rows of rl_sft
    and verl's padding rows already left out)."""
    groups = groups_by_uid(uids)
    pick = lambda values: [[values[r] for r in rows] for rows in groups]  # noqa: E731
    return rollout_metrics(pick(rewards), pick(teacher), pick(lengths), pick(no_think_end))


def our_names(metrics: dict[str, Any]) -> dict[str, float]:
    """The step's metrics under our names: verl prefixes what the actor's loss returns with
    ``actor/``; a few others are renamed."""
    out = {}
    for key, value in metrics.items():
        name = RENAMED.get(key) or (key[len("actor/"):] if key.startswith("actor/") else key)
        if name in names.STEP_METRICS:
            out[name] = float(value)
    return out


class SaveAfterLogging:
    """A metrics logger that runs ``save()`` after each ``log`` (even one that fails)."""

    def __init__(self, inner: Any, save: Callable[[], None]):
        self.inner, self.save = inner, save

    def log(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.inner.log(*args, **kwargs)
        finally:
            self.save()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@register_trainer(TRAINER_MODE)
class LuffyTrainer(PPOTrainerSync):
    def on_init_end(self):
        self.luffy = OmegaConf.to_container(self.config.luffy, resolve=True)
        self.actor_rollout_wg.set_loss_fn(partial(luffy_loss, luffy=self.luffy))
        # a resumed run repeats the steps after its checkpoint (all, without one): drop their old lines
        io.truncate_jsonl(self.luffy["metrics_path"], lambda record: record["step"] < self.global_steps)
        super().on_init_end()

    def on_step_begin(self):
        """A chained job whose time ran short at the last step: that step is saved and logged,
        so say so (the supervisor then ends the run) instead of starting another."""
        if getattr(self, "_time_up_step", None) is not None:
            io.write_json(os.environ[TIME_UP_FILE], {"step": self._time_up_step})
            time.sleep(3600)  # the supervisor ends this process within seconds
        super().on_step_begin()
        self._step_began = time.monotonic()

    def on_step_end(self):
        """A chained SLURM job nearing its end (the ESI variable the engine sets: luffy.chain):
        a checkpoint now, unless this step saved one anyway (verl's sync trainer has no ESI
        check of its own); the run stops before the next step."""
        super().on_step_end()
        took = time.monotonic() - getattr(self, "_step_began", time.monotonic())
        self._longest_step = max(getattr(self, "_longest_step", 0.0), took)
        if not os.environ.get(TIME_UP_FILE) or self.global_steps >= self.total_training_steps:
            return
        if should_save_ckpt_esi(self._longest_step, redundant_time=self._longest_step):
            print(f"checkpoint at step {self.global_steps}: the job's time limit is near", flush=True)
            freq = self.config.trainer.save_freq
            if not (freq > 0 and self.global_steps % freq == 0):
                self._save_checkpoint()
            self._time_up_step = self.global_steps

    @property
    def logger(self):
        return self._luffy_logger

    @logger.setter
    def logger(self, tracking) -> None:
        """verl's ``Tracking`` (set in ``fit``) at our step numbers (from 0, as ``metrics.jsonl`` and
        the local engine), minus the steps the MLflow run already holds: a resumed run repeats the
        steps after its checkpoint, and each step is logged once. (The stage logs its preflight at
        step 0 before the run starts: only a metric of verl's own steps tells what is held.) A
        step's checkpoint is saved once its metrics are logged (``_save_checkpoint``)."""
        self._luffy_logger = SaveAfterLogging(
            OnceLogger(tracking, logged_through(os.environ.get("MLFLOW_RUN_ID"), STEP_KEY), shift=1),
            self._save_pending_checkpoint)

    def _save_checkpoint(self):
        """Deferred to the end of the step. verl saves a step's checkpoint before it records the
        step (``metrics.jsonl``, MLflow): a run ended between the two (scancel, Ctrl-C) resumed
        after a step that no record held, and its metrics were lost (seen on two SLURM nodes:
        MLflow without step 0). Saved after the step's metrics are logged, a checkpoint's steps
        are always recorded; a run ended before the save repeats the step, whose MLflow values
        stay the first attempt's (logged once), as for any step after the last checkpoint."""
        self._checkpoint_pending = True

    def _save_pending_checkpoint(self) -> None:
        if getattr(self, "_checkpoint_pending", False):
            self._checkpoint_pending = False
            super()._save_checkpoint()

    def _rows(self, batch, fields: list[str]) -> TensorDict:
        return tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)

    def _compute_advantage(self, batch, metrics: dict):
        if self.luffy["algorithm"] != "rl_sft":
            return super()._compute_advantage(batch, metrics)
        data = self._rows(batch, ["uid", "rm_scores", "response_mask", SFT_MASK])
        rewards = [float(row.sum()) for row in data["rm_scores"].unbind()]
        trace_row = [bool(row.sum() > 0) for row in data[SFT_MASK].unbind()]
        advantages = split_baseline_advantages(list(data["uid"]), rewards, [not t for t in trace_row],
                                               self.config.algorithm.norm_adv_by_std_in_grpo)
        mask = data["response_mask"]
        padded = mask.to_padded_tensor(padding=0).float() * torch.tensor(advantages).unsqueeze(-1)
        nested = response_to_nested(padded, mask)
        # the returned meta lists the new fields: the actor update reads the ones it lists
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                               fields=TensorDict({"advantages": nested, "returns": nested.clone()},
                                                 batch_size=len(batch)))

    def _update_actor(self, batch, metrics: dict):
        if self.luffy["algorithm"] == "rl_sft":
            data = self._rows(batch, ["response_mask", SFT_MASK])
            dp_size = max(self.actor_rollout_wg._query_dispatch_info("actor")) + 1
            minibatch_rows = self.config.actor_rollout_ref.actor.ppo_mini_batch_size * \
                self.config.actor_rollout_ref.rollout.n
            totals = minibatch_totals(minibatch_of_rows(len(batch), dp_size, minibatch_rows),
                                      [int(row.sum()) for row in data["response_mask"].unbind()],
                                      [int(row.sum()) for row in data[SFT_MASK].unbind()])
            batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                                    fields=TensorDict({MINIBATCH_TOTALS: torch.tensor(totals)}, batch_size=len(batch)))
        return super()._update_actor(batch, metrics)

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        fields = ["uid", "rm_scores", "responses", OFF_POLICY_MASK, "extra_fields"]
        if self.luffy["algorithm"] == "rl_sft":
            fields.append(SFT_MASK)
        data = self._rows(batch, fields)
        real = [not tag.get("is_padding", False) for tag in batch.tags]
        if SFT_MASK in fields:
            real = [r and not bool(m.sum() > 0) for r, m in zip(real, data[SFT_MASK].unbind())]
        rows = [i for i, keep in enumerate(real) if keep]
        extra = list(data["extra_fields"])
        ours = step_metrics(
            [list(data["uid"])[i] for i in rows],
            [float(data["rm_scores"][i].sum()) for i in rows],
            [bool(data[OFF_POLICY_MASK][i].sum() > 0) for i in rows],
            [int(n) for n in np.asarray(data["responses"].offsets().diff())[rows]],
            [bool((extra[i] or {}).get("reward_extra_info", {}).get("no_think_end", 0.0)) for i in rows])
        ours.update(our_names(metrics))
        metrics.update(ours)
        io.append_jsonl(self.luffy["metrics_path"], {"step": global_steps - 1, **ours})
