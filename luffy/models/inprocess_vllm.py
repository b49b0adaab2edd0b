"""vLLM's offline engine inside the calling process (evaluation's backend, the local engine's
rollouts): no spawned engine process, so no ``if __name__ == "__main__"`` guard is needed in
the caller, the engine shares the caller's torch random state, and the caller can reach its
model (``collective_rpc``) to reload weights."""

from __future__ import annotations

import os
from typing import Any


def in_process_llm(**engine_args: Any):
    """``vllm.LLM(**engine_args)`` with its engine core in this process and its log on stderr
    (stdout stays the command's output)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import LLM

    return LLM(**engine_args)
