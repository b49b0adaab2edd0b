"""Attention for the local engine and the HF evaluation backend: transformers' SDPA attention,
with grouped-query attention done by SDPA itself.

transformers' ``sdpa`` repeats each key/value head ``num_heads / num_kv_heads`` times
(``repeat_kv``, a copy of the whole KV cache per layer and decode step) unless the attention
has no mask and runs on CUDA; a batch of left-padded prompts always has a mask. PyTorch's
``scaled_dot_product_attention(..., enable_gqa=True)`` reads each key/value head for its
query heads in place, with or without a mask, on every device. Same math:

    softmax(Q_h K_{g(h)}^T * scale + mask) V_{g(h)},  g(h) = h // (num_heads / num_kv_heads)

Registered under :data:`NAME` with transformers' ``AttentionInterface`` (and SDPA's mask
builder under the same name); :func:`use_gqa_sdpa` switches a loaded model to it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "luffy_gqa_sdpa"


def gqa_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention (query [batch, heads, q, dim], key/value [batch, kv_heads,
    kv, dim]) with ``enable_gqa``; anything but a plain grouped-query call (equal head counts, a
    position bias, a paged cache) goes to transformers' own function unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as transformers decides: the causal flag only for a maskless prefill, else the mask says it
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=causal,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_gqa_sdpa(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` switched to :data:`NAME` where it uses transformers' ``sdpa`` (a model on
    another attention keeps it); returns the model."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)
    return model
