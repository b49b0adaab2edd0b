"""Export trained weights as a HuggingFace model directory, verified by reloading.

The export is only published if the reloaded model's logits on a probe batch match the
trained weights' logits (``ExportMismatch`` otherwise), so evaluation never loads a model
that differs from the one that was trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from luffy.errors import ExportMismatch
from luffy.io import atomic_dir

log = logging.getLogger(__name__)
PROBE_TEXTS = ("What is 12+7-5?", "The answer is \\boxed{14}.", "<think>\n1+2=3\n</think>")


@torch.no_grad()
def probe_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    batch = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def export_verified(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                    atol: float = 1e-5, metadata: dict | None = None) -> float:
    """``save_pretrained`` model + tokenizer into ``out_dir`` (atomically) after verifying that
    a reload gives the same probe logits; returns the max absolute logit difference."""
    expected = probe_logits(model, tokenizer)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if metadata:
            (tmp / "luffy_export.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        # compared in the weights' own dtype (float32 from the local engine, bfloat16 from verl's merger)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=next(model.parameters()).dtype)
        got = probe_logits(reloaded, AutoTokenizer.from_pretrained(tmp))
        if got.shape != expected.shape:
            raise ExportMismatch(f"exported model gives logits of shape {tuple(got.shape)}, "
                                 f"trained model {tuple(expected.shape)}")
        diff = float((got - expected).abs().max())
        if not diff <= atol:
            raise ExportMismatch(f"exported model's probe logits differ from the trained weights' by {diff:.3g} "
                                 f"(tolerance {atol:g}); refusing to publish {out_dir}")
    log.info("exported %s (probe logits max |diff| = %.3g)", out_dir, diff)
    return diff


def load_trained(base_model: str, state_dict_path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base architecture with the trained weights of a local-engine checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    state = torch.load(state_dict_path, map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings may be absent from (or extra in) a state dict; anything else is an error.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportMismatch(f"checkpoint {state_dict_path} does not fit {base_model}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, AutoTokenizer.from_pretrained(base_model)
