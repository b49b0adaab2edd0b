"""Models: the tiny demo model, preparation, generation, export and scoring."""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def model_source(path: str, what: str = "model") -> str:
    """``path`` when it is a local model directory or has the shape of a HuggingFace hub id
    ('Qwen/Qwen2.5-Math-7B'); a missing local path is a one-line error naming it, instead of
    transformers' traceback about repo ids."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{what} '{path}' is a file, not a model directory (config.json, weights, tokenizer)")
    if HUB_ID.fullmatch(path) and not path.startswith((".", "~")) and ".." not in path:
        return path
    raise FileNotFoundError(f"{what} '{path}': the path does not exist (and it is not a HuggingFace hub id)")
