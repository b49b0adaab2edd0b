"""Nothing set through ``verl.overrides`` is silently ignored: every key of verl 0.9.1's actor
(its checkpoint included) and algorithm config, walked in verl's own composed config, is
classified as mapped (from the experiment's settings), refused (with why and what instead) or
free (verl honours it and LUFFY's math is untouched); the refused ones end `luffy check-config`
in one line each."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from luffy.engines.verl.compose import PPO_CONFIG, compose
from luffy.engines.verl.keys import FREE, REFUSED, WALKED
from luffy.engines.verl.overrides import PPO_MAPPED, check_extra_overrides

REPO = Path(__file__).resolve().parents[1]
LUFFY = Path(sys.executable).parent / "luffy"


def leaves(node, prefix: str) -> list[str]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() if key != "_target_" for leaf in leaves(value, f"{prefix}.{key}")]
    return [prefix]


@pytest.fixture(scope="module")
def verl_keys() -> list[str]:
    config = OmegaConf.to_container(compose(PPO_CONFIG, []), resolve=False)
    return [leaf[1:] for leaf in leaves(config, "")]


def classify(key: str) -> tuple[str, str]:
    """(class, entry): the longest entry (mapped, refused or free) that covers ``key``."""
    entries = [("mapped", m) for m in PPO_MAPPED] + [("refused", e.rstrip(".")) for e in REFUSED] + \
              [("free", e.rstrip(".")) for e in FREE]
    covering = [(len(entry), kind, entry) for kind, entry in entries if key == entry or key.startswith(entry + ".")]
    if not covering:
        return "unclassified", ""
    _, kind, entry = max(covering)
    return kind, entry


def test_every_actor_and_algorithm_key_of_verl_is_classified(verl_keys):
    walked = [key for key in verl_keys if key.startswith(WALKED)]
    classes = {key: classify(key) for key in walked}
    unclassified = sorted(key for key, (kind, _) in classes.items() if kind == "unclassified")
    assert not unclassified, f"classify these verl keys in luffy/engines/verl/keys.py: {unclassified}"
    counts = {kind: sum(1 for k, _ in classes.values() if k == kind) for kind in ("mapped", "refused", "free")}
    print(f"verl keys under {WALKED}: {len(walked)}: {counts}")  # the closing note's figures
    assert counts["refused"] >= 25 and counts["free"] >= 30 and counts["mapped"] >= 30
    # no entry is stale (a key verl no longer has) or shadowed by a longer one
    used = {entry for _, entry in classes.values()}
    for entry in [*REFUSED, *FREE]:
        name = entry.rstrip(".")
        if name.startswith(WALKED):
            assert name in used, f"{entry}: no verl key takes this entry"
        else:  # LoRA's keys, outside the walked sections: verl has them
            assert any(key == name or key.startswith(name + ".") for key in verl_keys), entry


@pytest.mark.parametrize("override, entry", [
    ("algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction"),
    ("algorithm.rollout_correction.rollout_is_threshold=2.0", "algorithm.rollout_correction"),
    ("actor_rollout_ref.actor.policy_loss.loss_mode=gspo", "actor_rollout_ref.actor.policy_loss"),
    ("actor_rollout_ref.actor.clip_ratio_c=3.0", "actor_rollout_ref.actor.clip_ratio_c"),
    ("actor_rollout_ref.actor.checkpoint.async_save=true", "actor_rollout_ref.actor.checkpoint.async_save"),
    ("actor_rollout_ref.model.lora_rank=32", "actor_rollout_ref.model.lora_rank"),
    ("+actor_rollout_ref.model.lora.rank=8", "actor_rollout_ref.model.lora"),
    ("algorithm.gamma=0.99", "algorithm.gamma"),
])
def test_a_refused_key_is_named_with_why(override, entry):
    with pytest.raises(ValueError, match=rf"verl's {entry} is refused: \S"):
        check_extra_overrides([override])


def test_free_keys_pass_to_verl():
    check_extra_overrides(["actor_rollout_ref.actor.fsdp_config.reshard_after_forward=false",
                           "actor_rollout_ref.actor.entropy_checkpointing=true",
                           "actor_rollout_ref.actor.checkpoint.strict=false"])


def test_check_config_refuses_each_in_one_line(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "verl_toy.yaml").read_text())
    for override in ("algorithm.rollout_correction.rollout_is=token",
                     "actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
                     "actor_rollout_ref.actor.checkpoint.async_save=true", "actor_rollout_ref.model.lora_rank=16"):
        raw.setdefault("verl", {})["overrides"] = [override]
        path = tmp_path / "refused.yaml"
        path.write_text(yaml.safe_dump(raw))
        done = subprocess.run([str(LUFFY), "check-config", str(path)], capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("luffy check-config: error: config key 'verl.overrides': ") and \
            f"'{override}': verl's" in lines[0] and "is refused: " in lines[0], lines[0]
