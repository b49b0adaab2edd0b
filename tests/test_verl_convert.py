"""convert on a verl checkpoint: an FSDP checkpoint written on the CPU by verl's own checkpoint
manager (FSDP2 over 2 gloo ranks, as the actor writes one) goes through our engine's final
directory and ``convert`` (``python -m verl.model_merger`` + our verified export) to a
HuggingFace model whose logits are the original model's in the merger's dtype (bfloat16)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from luffy.engines.base import read_manifest, write_manifest
from luffy.engines.verl.engine import VerlEngine
from luffy.models.export import PROBE_TEXTS
from luffy.stages import convert

HELPER = Path(__file__).parent / "helpers" / "write_fsdp_checkpoint.py"


@pytest.mark.slow
def test_fsdp_checkpoint_converts_to_a_model_with_the_same_logits(tiny_model_dir, tmp_path):
    actor = tmp_path / "work" / "checkpoints" / "global_step_3" / "actor"
    subprocess.run([sys.executable, str(HELPER), tiny_model_dir, str(actor), "2", "29531"], check=True)
    assert sorted(p.name for p in actor.glob("model_world_size_2_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]

    # the engine's final directory: the model shards (not the optimizer's), and the manifest
    final = tmp_path / "final"
    final.mkdir()
    VerlEngine._link_shards(actor, final / "actor")
    write_manifest(final, engine="verl", base_model=tiny_model_dir, steps=3, selected={"step": 3, "rule": "last"},
                   settings={}, weights="actor")
    assert not list((final / "actor").glob("optim_*")) and (final / "actor" / "fsdp_config.json").exists()
    assert read_manifest(final)["engine"] == "verl"

    out = tmp_path / "model"
    convert(str(final), str(out), group="exp", rule="convert")
    exported = json.loads((out / "luffy_export.json").read_text())
    assert exported["engine"] == "verl" and exported["stage"] == "convert"

    # the reference: the original weights in bfloat16, saved and loaded the way the converted model is
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(torch.bfloat16).save_pretrained(
        tmp_path / "reference")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype="auto").eval()
    converted = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert converted.dtype == torch.bfloat16
    reference_weights = original.state_dict()
    for name, value in converted.state_dict().items():
        assert torch.equal(value, reference_weights[name]), name
    batch = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected, got = original(**batch).logits, converted(**batch).logits
    assert got.shape == expected.shape
    assert float((got.float() - expected.float()).abs().max()) == 0.0
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
