"""The teacher trace joins its prompt's group: one agent loop for every member.

verl's V1 agent-loop worker runs ``rollout.n`` sessions per prompt, with ``session_id`` 0..n-1,
all sharing the prompt's ``uid`` (so they form one GRPO group). This loop gives the first
sessions the teacher trace instead of a sample:

- luffy: sessions ``< n_off`` are the teacher members planned by ``plan_teacher_members``:
  the whole trace + EOS (every token off-policy, nothing generated), or with partial-prefix
  guidance the first k trace tokens continued by the policy (``max_tokens`` capped so the
  member fits ``response_length``; only the prefix is off-policy);
- rl_sft: session 0 is the trace row for the SFT term (``response_mask`` 0: not a policy
  member; ``luffy_sft_mask`` 1 on its tokens), sessions 1..n are the on-policy group;
- every other session, and every row without a trace (validation), is sampled by the server.

Each output carries the per-token fields of ``luffy.engines.verl.loss`` so the loss sees
which tokens are the teacher's. The plan of a group is drawn from a generator seeded by
(seed, step, row index), so every session of a group agrees on it without talking.
"""

from __future__ import annotations

import random
from typing import Any, Optional
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput
from verl.utils.profiler import simple_timer

from luffy.algo.groups import off_policy_mask, plan_teacher_members, teacher_logprob_layout, training_progress
from luffy.data.templates import encode_traces, render_prompt
from luffy.engines.verl.loss import OFF_POLICY_MASK, SFT_MASK, TEACHER_LOG_PROB


class LuffyAgentLoopOutput(AgentLoopOutput):
    """verl's output plus our per-token fields (V1 stores every ``as_dict`` entry as a column)."""

    off_policy_mask: list[int] = []
    teacher_log_prob: Optional[list[float]] = None
    sft_mask: Optional[list[int]] = None

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        for name in ("off_policy_mask", "teacher_log_prob", "sft_mask"):
            out.pop(name, None)
        out[OFF_POLICY_MASK] = torch.tensor(self.off_policy_mask, dtype=torch.int64)
        if self.teacher_log_prob is not None:
            out[TEACHER_LOG_PROB] = torch.tensor(self.teacher_log_prob, dtype=torch.float32)
        if self.sft_mask is not None:
            out[SFT_MASK] = torch.tensor(self.sft_mask, dtype=torch.int64)
        return out


def group_seed(seed: int, step: int, index: int) -> int:
    """The generator seed of one group's plan (the same in every session of the group)."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


class LuffyAgentLoop(AgentLoopBase):
    """Single-turn agent loop whose first sessions are the teacher's (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.luffy = self.config.luffy
        self.response_length = self.rollout_config.response_length

    async def _sample(self, prompt_ids: list[int], sampling_params: dict[str, Any], max_tokens: int) -> list[int]:
        params = {**sampling_params, "max_tokens": max_tokens}
        output = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                    sampling_params=params)
        return list(output.token_ids)[:max_tokens]

    def _trace(self, messages: list[dict[str, str]], target: Any) -> list[int]:
        trace = target[0]["content"]
        ids = encode_traces(self.tokenizer, [render_prompt(self.tokenizer, messages)], [trace])[0]
        if len(ids) > self.response_length:
            raise ValueError(f"a teacher trace of {len(ids)} tokens (+EOS) does not fit response_length="
                             f"{self.response_length}; the preflight refuses such data")
        return ids

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        messages = list(kwargs["raw_prompt"])
        session = int(kwargs.get("session_id", 0))
        prompt_ids = await self.ct_build_initial_tokens(messages)
        target = kwargs.get("target")
        trace_sessions = self.luffy.trace_rows if self.luffy.algorithm == "rl_sft" else self.luffy.n_off
        metrics: dict[str, float] = {}
        teacher = self.luffy.teacher_logprobs
        with simple_timer("generate_sequences", metrics):
            if target is None or session >= trace_sessions:  # an on-policy member (or a validation row)
                response = await self._sample(prompt_ids, sampling_params, self.response_length)
                fields = {"response_mask": [1] * len(response), "off_policy_mask": [0] * len(response)}
                if teacher:
                    fields["teacher_log_prob"] = [0.0] * len(response)
            elif self.luffy.algorithm == "rl_sft":  # the trace row of the SFT term
                response = self._trace(messages, target)
                fields = {"response_mask": [0] * len(response), "off_policy_mask": [0] * len(response),
                          "sft_mask": [1] * len(response)}
            else:  # a teacher member of the group
                trace = self._trace(messages, target)
                step = int(kwargs.get("global_steps", 1)) - 1  # verl counts steps from 1
                rng = random.Random(group_seed(self.luffy.seed, step, int(kwargs.get("index", 0))))
                plan = plan_teacher_members(len(trace), self.luffy.n_off, self.luffy.prefix_strategy,
                                            self.luffy.prefix_ratio_min, self.luffy.prefix_ratio_max, rng,
                                            training_progress(step, self.luffy.steps))
                k = plan[session]
                if k is None:
                    response, off_tokens = trace, len(trace)
                else:
                    continuation = await self._sample(prompt_ids + trace[:k], sampling_params,
                                                      self.response_length - k)
                    response, off_tokens = trace[:k] + continuation, k
                row = torch.ones(1, len(response))
                fields = {"response_mask": [1] * len(response),
                          "off_policy_mask": off_policy_mask(row, torch.tensor([off_tokens]))[0].long().tolist()}
                if teacher:
                    scored = [float(v) for v in kwargs["teacher_logprobs"]]
                    scored += [0.0] * (len(trace) - len(scored))  # the EOS: pi_phi = 1 when not scored
                    fields["teacher_log_prob"] = teacher_logprob_layout(row, [off_tokens], [scored])[0].tolist()
            if self.luffy.algorithm == "rl_sft":
                fields.setdefault("sft_mask", [0] * len(response))
        metrics.setdefault("num_preempted", -1)
        output = LuffyAgentLoopOutput(prompt_ids=prompt_ids, response_ids=response, num_turns=2, metrics=metrics,
                                      **fields)
        output.extra_fields.update({"turn_scores": [], "tool_rewards": []})  # the schema of verl's own loops
        return output
