"""Models: the tiny demo model, preparation, generation, export and scoring."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from luffy.errors import ModelUnreadable

if TYPE_CHECKING:
    from luffy.config import ExternalModelConfig

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# a directory is a model (or a tokenizer) when it holds one of these files
MODEL_FILES, TOKENIZER_FILES = ("config.json",), ("tokenizer_config.json", "tokenizer.json", "config.json")
SHIPPED_DIR = Path(__file__).parent / "tokenizer"  # the demo's byte-level tokenizer (luffy.models.tokenizer)


def model_source(path: str, what: str = "model", wanted: tuple[str, ...] = MODEL_FILES) -> str:
    """``path`` when it is a local model directory (holding one of ``wanted``) or has the shape of
    a HuggingFace hub id ('Qwen/Qwen2.5-Math-7B'); a missing local path, or a directory without
    those files, is a one-line error naming it, instead of transformers' traceback."""
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, name)) for name in wanted):
            raise FileNotFoundError(f"{what} '{path}': a directory without {' or '.join(wanted)}, not a {what} "
                                    "directory")
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{what} '{path}' is a file, not a model directory (config.json, weights, tokenizer)")
    if HUB_ID.fullmatch(path) and not path.startswith((".", "~")) and ".." not in path:
        return path
    raise FileNotFoundError(f"{what} '{path}': the path does not exist (and it is not a HuggingFace hub id)")


def check_external_model(name: str, model: ExternalModelConfig) -> dict[str, str | None]:
    """Read an external model's config and tokenizer before its evaluation loads it, and say
    where it came from: ``source`` ('hub:<id>[@<revision>]' or 'path:<dir>') and, for a hub
    model, ``commit`` (the revision resolved to a commit, also offline from the local cache).
    Anything unreadable is a ``ModelUnreadable`` naming the model, its source and the reason."""
    where = f"external model '{name}' ({model.source})"
    if model.path is not None:
        if not os.path.exists(model.path):
            raise ModelUnreadable(f"{where}: the directory does not exist")
        if not os.path.isdir(model.path):
            raise ModelUnreadable(f"{where}: a file, not a model directory (config.json, weights, tokenizer)")
        if not os.path.isfile(os.path.join(model.path, "config.json")):
            raise ModelUnreadable(f"{where}: no config.json in the directory; is it a HuggingFace model?")
    from transformers import AutoConfig, AutoTokenizer

    target = model.hub or str(model.path)
    try:
        config = AutoConfig.from_pretrained(target, revision=model.revision)
        AutoTokenizer.from_pretrained(target, revision=model.revision)
    except Exception as err:  # transformers / huggingface_hub raise many types (OSError, ValueError, HTTP errors)
        reason = " ".join(str(err).split())
        raise ModelUnreadable(f"{where}: cannot read its config or tokenizer: {reason[:400]}") from None
    commit = getattr(config, "_commit_hash", None) if model.hub else None
    return {"name": name, "source": model.source, "hub": model.hub, "revision": model.revision,
            "commit": commit, "path": os.path.abspath(model.path) if model.path else None}
