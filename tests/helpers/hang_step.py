"""Rollouts that wait, for the stall and chain tests (tests/test_verl_e2e.py).

Named in ``VERL_USE_EXTERNAL_MODULES``, verl imports it in every process of a run; in the
agent-loop workers then
- the rollout of step ``LUFFY_TEST_HANG_AT_STEP`` waits forever, as when a vLLM worker fails
  under verl's server and the driver waits for the rollout with no progress;
- the first step's rollout waits until ``LUFFY_TEST_FIRST_ROLLOUT_AT`` (epoch seconds), so that
  the first step ends at a known time however long the run's start-up took (a start-up slower
  than that only shortens the wait).
"""

import asyncio
import os
import time

from luffy.engines.verl.agent_loop import LuffyAgentLoop

HANG_AT = int(os.environ["LUFFY_TEST_HANG_AT_STEP"]) if os.environ.get("LUFFY_TEST_HANG_AT_STEP") else None
FIRST_ROLLOUT_AT = float(os.environ.get("LUFFY_TEST_FIRST_ROLLOUT_AT", "0"))
_run = LuffyAgentLoop.run


async def run(self, sampling_params, **kwargs):
    step = int(kwargs.get("global_steps", 0))
    if step == HANG_AT:
        await asyncio.Event().wait()
    if step == 1 and FIRST_ROLLOUT_AT > time.time():
        await asyncio.sleep(FIRST_ROLLOUT_AT - time.time())
    return await _run(self, sampling_params, **kwargs)


LuffyAgentLoop.run = run
