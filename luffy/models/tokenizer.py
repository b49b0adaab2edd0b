"""The character-level tokenizer shipped in ``luffy/models/tokenizer/`` for the tiny demo model.

One token per byte: a byte-level BPE without merges, in the exact format of Qwen2's
tokenizer (its pre-tokenizer regex and byte-level mapping), because transformers loads any
``qwen2`` model's tokenizer through ``Qwen2Tokenizer``, which rebuilds the pipeline from the
vocabulary and merges. Plus the chat specials and ``<think>`` / ``</think>``. Its chat
template follows Qwen's ChatML with the reference's generation prompt, which ends with
``<think>\\n`` (so teacher traces are appended without their own leading ``<think>\\n``).
``build_tokenizer()`` regenerates the shipped files; a test checks they are in sync.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from luffy.models import SHIPPED_DIR

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Qwen2's pre-tokenizer pattern (transformers' Qwen2Tokenizer uses the same).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n<think>\n' }}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    byte_chars = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(byte_chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=4096, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": PAD, "eos_token": EOS, "additional_special_tokens": [BOS]})
    tokenizer.add_tokens([THINK_OPEN, THINK_CLOSE])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_shipped_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(SHIPPED_DIR))


if __name__ == "__main__":
    build_tokenizer().save_pretrained(str(SHIPPED_DIR))
    print(f"wrote {SHIPPED_DIR}")
