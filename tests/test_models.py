import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from luffy.models.export import ExportMismatch, export_verified, load_trained, probe_logits
from luffy.models.tokenizer import SHIPPED_DIR, build_tokenizer, load_shipped_tokenizer

TEXT = "<|im_start|>user\nWhat is 12+7-5?  ok<|im_end|>\n<think>\n12+7=19\n</think>\nThe answer is \\boxed{-14}.<|im_end|>"


def test_shipped_tokenizer_matches_its_builder():
    shipped, built = load_shipped_tokenizer(), build_tokenizer()
    assert shipped.get_vocab() == built.get_vocab()
    assert shipped(TEXT)["input_ids"] == built(TEXT)["input_ids"]
    assert shipped.chat_template == built.chat_template
    assert SHIPPED_DIR.joinpath("tokenizer.json").exists()


def test_tokenizer_round_trips_and_keeps_think_tokens():
    tok = load_shipped_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    plain = tok.decode(ids, skip_special_tokens=True)
    assert "</think>" in plain and "<|im_end|>" not in plain
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_exported_model_reloads_with_the_same_tokenizer_behaviour(tiny_model_dir):
    # transformers loads any qwen2 model's tokenizer through Qwen2Tokenizer: it must agree.
    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert reloaded(TEXT)["input_ids"] == load_shipped_tokenizer()(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"


def test_export_verifies_and_checkpoint_round_trip(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    trained, tok = load_trained(tiny_model_dir, tmp_path / "model.pt")
    diff = export_verified(trained, tok, tmp_path / "hf")
    assert diff == 0.0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.equal(probe_logits(again, tok), probe_logits(model, tok))


def test_export_refuses_a_mismatch(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    original = model.save_pretrained

    def corrupting_save(path, **kw):  # simulates a writer that loses precision
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(1.5)
        original(path, **kw)

    monkeypatch.setattr(model, "save_pretrained", corrupting_save)
    with pytest.raises(ExportMismatch, match="differ from the trained weights"):
        export_verified(model, tok, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_checkpoint_of_another_architecture_is_refused(tiny_model_dir, tmp_path):
    torch.save({"not.a.weight": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ExportMismatch, match="does not fit"):
        load_trained(tiny_model_dir, tmp_path / "model.pt")
