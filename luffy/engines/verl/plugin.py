"""Imported by ``import verl`` in every process of a run (``VERL_USE_EXTERNAL_MODULES``): registers
our agent loop (``actor_rollout_ref.rollout.agent.default_agent_loop=luffy_agent``) and our
trainer (``trainer.v1.trainer_mode=luffy``) in verl's registries."""

from verl.experimental.agent_loop.agent_loop import register

from luffy.engines.verl import trainer  # noqa: F401  (registers LuffyTrainer)
from luffy.engines.verl.agent_loop import LuffyAgentLoop
from luffy.engines.verl.overrides import AGENT_LOOP

register(AGENT_LOOP)(LuffyAgentLoop)
