"""The training engines by name (``experiments.<name>.engine``) and what each cannot do.

Plain data about settings, read by the config's checks: no torch, no verl, nothing of
``luffy.engines``. ``luffy.engines.registry.make_engine`` imports an engine's module by the
path named here. ``unsupported_settings`` names every setting an engine would otherwise
silently ignore, so that config validation refuses it before a job runs.
"""

from __future__ import annotations

from typing import Any, Callable

ENGINES: dict[str, str] = {
    "local": "luffy.engines.local.engine:LocalEngine",  # one process, CPU or one GPU, KV-cached sampling
    "verl": "luffy.engines.verl.engine:VerlEngine",     # verl 0.9.1 + vLLM rollouts, GPU nodes through Ray
}
ENGINE_NAMES = tuple(ENGINES)

Check = Callable[[Any], bool]
# engine -> [(setting, is it set to something the engine cannot do?, why)]
UNSUPPORTED: dict[str, list[tuple[str, Check, str]]] = {
    "local": [],
    "verl": [
        ("filter_groups", lambda s: s.filter_groups,
         "verl's group filter (DAPO) refills the batch with new prompts instead of dropping groups; "
         "use engine local for this setting"),
        ("micro_batch_tokens", lambda s: s.micro_batch_tokens == 0,
         "verl needs a token budget per GPU micro-batch (micro_batch_tokens > 0)"),
        ("warmup_steps", lambda s: s.warmup_steps > 0 and s.algorithm != "sft",
         "verl's warm-up starts its first update at learning rate 0 (the reference's weakness); "
         "use warmup_steps 0"),
        ("advantage_baseline", lambda s: s.advantage_baseline == "on_policy" and s.algorithm == "luffy",
         "verl's GRPO baselines a group on all its members; an on-policy-only baseline exists for rl_sft only"),
    ],
}


def unsupported_settings(engine: str, settings: Any) -> list[tuple[str, str]]:
    """(setting, why) for each of ``settings`` that ``engine`` cannot honour."""
    return [(key, why) for key, is_set, why in UNSUPPORTED[engine] if is_set(settings)]
