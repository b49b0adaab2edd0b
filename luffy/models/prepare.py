"""A base model prepared for training: a copy of a hub or local model directory with some of
its config.json keys changed and, optionally, another chat template.

The paper trains Qwen2.5-Math-7B with its context raised to 16k tokens
(``max_position_embeddings`` 16384, ``rope_theta`` 40000) and a chat template whose generation
prompt ends with ``<think>\\n``. Every stage (preflight, training, evaluation of the base
model) then reads one directory, ``results/models/base``, so they cannot disagree on either.

Weights are hard-linked from the source where the file system allows (copied otherwise); the
config is patched as JSON (loader-version independent) and checked by reloading it.

A rehearsal replaces the weights by a **stand-in** (``base_model.stand_in``): a randomly
initialised model of the same architecture (``model_type`` and class), built from the patched
config with fewer and narrower layers, saved with the source's tokenizer and chat template.
Only the source's config and tokenizer files are read (for a hub model: downloaded, a few MB).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from luffy.config import ConfigError
from luffy.io import atomic_dir, link_or_copy

log = logging.getLogger(__name__)
CONFIG, TOKENIZER_FILES = "config.json", ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")
METADATA = "luffy_base.json"


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ckpt")


def resolve_model_dir(source: str, weights: bool = True) -> Path:
    """A local model directory as is; a hub id downloaded (or found in the hub cache), without
    its weight files when ``weights`` is false."""
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, ignore_patterns=None if weights else list(WEIGHT_PATTERNS)))
    except Exception as err:  # offline, gated, unknown id
        why = " ".join(str(err).split())  # one line, whatever the hub client's message looks like
        raise ConfigError(f"config key 'base_model.path': cannot fetch '{source}' from the HuggingFace hub "
                          f"({type(err).__name__}: {why}); download it and give its directory instead") from None


def patch_config(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config.json with ``overrides`` applied; ``rope_theta`` also inside ``rope_parameters``
    (where transformers 5 keeps it) when the file has that section."""
    out = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        out[key] = value
        if key.startswith("rope_") and isinstance(out.get("rope_parameters"), dict):
            out["rope_parameters"][key] = value
    return out


def _effective(config: dict[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    return (config.get("rope_parameters") or {}).get(key)


def is_weight_file(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS) or name.endswith(".index.json")


def shrink(config: dict[str, Any], shape: Any) -> dict[str, Any]:
    """``config`` (a config.json) with the stand-in's layer count and widths; per-layer lists cut
    to the new layer count. The vocabulary, context, rope and every other key stay."""
    out = json.loads(json.dumps(config))
    out.update({"hidden_size": shape.hidden_size, "num_hidden_layers": shape.num_layers,
                "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
                "intermediate_size": shape.intermediate_size})
    if "head_dim" in out:
        out["head_dim"] = shape.hidden_size // shape.num_heads
    for key, value in list(out.items()):
        if isinstance(value, list) and key.startswith("layer_"):
            out[key] = value[:shape.num_layers]
    if isinstance(out.get("max_window_layers"), int):
        out["max_window_layers"] = min(out["max_window_layers"], shape.num_layers)
    return out


def build_stand_in(config_dir: Path, shape: Any) -> Any:
    """A randomly initialised model of ``config_dir``'s architecture and ``shape`` (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape.hidden_size % shape.num_heads or shape.num_heads % shape.num_kv_heads:
        raise ConfigError("config key 'base_model.stand_in': hidden_size must be a multiple of num_heads, and "
                          "num_heads of num_kv_heads")
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(shape.seed)
    model = AutoModelForCausalLM.from_config(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def prepare_base_model(source: str, config_overrides: dict[str, Any], chat_template: str | None,
                       out_dir: str | Path, stand_in: Any | None = None) -> dict[str, Any]:
    """Write the prepared copy of ``source`` to ``out_dir`` (atomically); returns what changed."""
    from transformers import AutoConfig, AutoTokenizer

    src = resolve_model_dir(source, weights=stand_in is None)
    if not (src / CONFIG).exists():
        raise ConfigError(f"config key 'base_model.path': {src} has no {CONFIG} (not a model directory)")
    raw = json.loads((src / CONFIG).read_text())
    unknown = [k for k in config_overrides if _effective(raw, k) is None]
    if unknown:
        raise ConfigError(f"config key 'base_model.config_overrides': {unknown} are not keys of {src / CONFIG}")
    changed = {k: {"from": _effective(raw, k), "to": v} for k, v in config_overrides.items()}
    patched = patch_config(raw, config_overrides)
    with atomic_dir(out_dir) as tmp:
        for item in src.iterdir():
            if item.name == CONFIG or item.name.startswith(".") or (stand_in is not None and is_weight_file(item.name)):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                link_or_copy(item.resolve(), tmp / item.name)
        (tmp / CONFIG).write_text(json.dumps(shrink(patched, stand_in) if stand_in is not None else patched,
                                             indent=2))
        if stand_in is not None:
            model = build_stand_in(tmp, stand_in)
            model.save_pretrained(tmp)
            changed["weights"] = {"from": source, "to": f"a random stand-in of {model.num_parameters():,} parameters "
                                                       f"({type(model).__name__})"}
        if chat_template is not None:
            tokenizer = AutoTokenizer.from_pretrained(src)
            tokenizer.chat_template = Path(chat_template).read_text()
            for name in TOKENIZER_FILES:
                (tmp / name).unlink(missing_ok=True)
            tokenizer.save_pretrained(tmp)
            changed["chat_template"] = {"from": "the model's", "to": chat_template}
        loaded = AutoConfig.from_pretrained(tmp).to_dict()
        wrong = {k: _effective(loaded, k) for k, v in config_overrides.items() if _effective(loaded, k) != v}
        if wrong:
            raise ConfigError(f"config key 'base_model.config_overrides': after reloading, {wrong} differ from "
                              f"the requested values (transformers ignores these keys)")
        (tmp / METADATA).write_text(json.dumps({"source": source, "changed": changed}, indent=2, default=str))
    log.info("prepared base model %s from %s: %s", out_dir, source, changed)
    return changed

