"""A rollout that never ends, for the stall test (tests/test_verl_e2e.py).

Named in ``VERL_USE_EXTERNAL_MODULES``, verl imports it in every process of a run; in the
agent-loop workers the rollout of step ``LUFFY_TEST_HANG_AT_STEP`` then waits forever, as when a
vLLM worker fails under verl's server and the driver waits for the rollout with no progress.
"""

import asyncio
import os

from luffy.engines.verl.agent_loop import LuffyAgentLoop

HANG_AT = int(os.environ.get("LUFFY_TEST_HANG_AT_STEP", "0"))
_run = LuffyAgentLoop.run


async def run(self, sampling_params, **kwargs):
    if int(kwargs.get("global_steps", 0)) == HANG_AT:
        await asyncio.Event().wait()
    return await _run(self, sampling_params, **kwargs)


LuffyAgentLoop.run = run
