"""verl 0.9.1's keys as LUFFY treats them: every key of the actor, its checkpoint and the
algorithm config is mapped, refused or free (plain data, no verl import; tests/test_verl_keys.py
walks verl's composed config and checks that no key is left out and no entry is stale).

- mapped: set from the experiment's settings (``overrides.PPO_MAPPED``); an override is refused;
- refused (``REFUSED``): it reaches LUFFY's loss or trainer and would be ignored or would break
  the run; an override is refused in one line that says why and what to use instead;
- free (``FREE``): verl honours it and it leaves LUFFY's math alone (memory layout, speed,
  precision of the engine, profiling); an override goes through to verl.

Entries are keys or sections (ending in '.'); a key takes the longest entry that covers it.
"""

from __future__ import annotations

ACTOR = "actor_rollout_ref.actor."
LOSS = "LUFFY's loss (luffy/algo) replaces verl's policy losses"

REFUSED: dict[str, str] = {
    "algorithm.rollout_correction.": "rollout importance sampling: LUFFY's loss does not apply its weights and the "
                                     "teacher rows carry no rollout log-probs; rollout and trainer log-probs stay "
                                     "apart only by numerics (pi_old is recomputed by the trainer)",
    ACTOR + "policy_loss.": f"{LOSS}; set the experiment's loss settings (clip, clip_ratio_high, on_policy_shaping, "
                            "shaping, loss_agg) instead",
    ACTOR + "clip_ratio_c": f"dual-clip PPO: {LOSS}, which has no dual clip",
    ACTOR + "clip_ratio": "use the experiment's clip_ratio (and clip_ratio_high)",
    ACTOR + "tau_pos": f"a parameter of verl's policy-loss modes: {LOSS}",
    ACTOR + "tau_neg": f"a parameter of verl's policy-loss modes: {LOSS}",
    ACTOR + "calculate_sum_pi_squared": "feeds verl's optimal-token-baseline advantages; LUFFY's are GRPO's "
                                        "(advantage_baseline, std_normalize)",
    ACTOR + "use_prefix_grouper": "verl's shared-prompt forward regroups the batch; it has not been run with LUFFY's "
                                  "teacher rows",
    ACTOR + "ppo_micro_batch_size": "the runs batch by tokens (verl's dynamic batch size): set micro_batch_tokens",
    ACTOR + "ppo_micro_batch_size_per_gpu": "the runs batch by tokens (verl's dynamic batch size): set "
                                            "micro_batch_tokens",
    ACTOR + "rollout_n": "follows the group size: set n",
    ACTOR + "use_remove_padding": "follows verl.attn_implementation (flash_attention_2 packs sequences, sdpa does "
                                  "not)",
    ACTOR + "freeze_vision_tower": "the pipeline trains text-only models: there is no vision tower to freeze",
    ACTOR + "qat.": "quantisation-aware training: the export and evaluation read full-precision weights; train "
                    "without it",
    ACTOR + "fsdp_config.qat.": "quantisation-aware training: the export and evaluation read full-precision weights; "
                                "train without it",
    ACTOR + "checkpoint.async_save": "an asynchronous save leaves verl's tracker file unwritten, so the run would end "
                                    "'without a checkpoint' and could not resume; saves stay synchronous",
    ACTOR + "checkpoint.save_contents": "resuming and the export need the model, optimizer and extra state that verl "
                                       "saves by default",
    ACTOR + "checkpoint.load_contents": "resuming needs the model, optimizer and extra state that verl saves by "
                                       "default",
    "algorithm.kl_ctrl.": "a KL penalty in the reward (algorithm.use_kl_in_reward), which LUFFY keeps off: set "
                          "kl_coef (a KL loss term) instead",
    "algorithm.kl_penalty": "a KL penalty in the reward (algorithm.use_kl_in_reward), which LUFFY keeps off: set "
                            "kl_coef (a KL loss term) instead",
    "algorithm.gamma": "GAE's discount: GRPO's advantages (the pipeline's) use none",
    "algorithm.lam": "GAE's lambda: GRPO's advantages (the pipeline's) use none",
    "algorithm.use_pf_ppo": "PF-PPO resamples the batch by reward, which breaks LUFFY's groups (the teacher member "
                            "and its prompt's samples)",
    "algorithm.pf_ppo.": "PF-PPO resamples the batch by reward, which breaks LUFFY's groups (the teacher member and "
                         "its prompt's samples)",
    # outside the walked sections: LoRA (the export reads the base weights; verl's merger writes the adapter beside)
    "actor_rollout_ref.model.lora_rank": "LoRA: the export reads the base weights only (verl's merger writes "
                                         "lora_adapter/ beside them), so the adapter would be lost; train full weights",
    "actor_rollout_ref.model.lora_alpha": "LoRA is not supported (the export would lose the adapter)",
    "actor_rollout_ref.model.lora_adapter_path": "LoRA is not supported (the export would lose the adapter)",
    "actor_rollout_ref.model.lora.": "LoRA is not supported (the export would lose the adapter)",
}

FREE: dict[str, str] = {
    ACTOR + "fsdp_config.": "FSDP's layout, offload policy, precision and compilation",
    ACTOR + "profiler.": "profiling",
    ACTOR + "use_torch_compile": "compilation",
    ACTOR + "use_fused_kernels": "fused log-prob kernels (the same log-probs)",
    ACTOR + "entropy_from_logits_with_chunking": "memory of the entropy computation",
    ACTOR + "entropy_from_logits_chunk_size": "memory of the entropy computation",
    ACTOR + "entropy_checkpointing": "memory of the entropy computation",
    ACTOR + "pad_to_length": "padding of packed batches",
    ACTOR + "ulysses_sequence_parallel_size": "Ulysses sequence parallelism (GPUs; not rehearsed on the CPU)",
    ACTOR + "checkpoint.strict": "strict loading of a checkpoint",
}

WALKED = (ACTOR, "algorithm.")  # the sections tests/test_verl_keys.py classifies key by key


def refusal(key: str) -> tuple[str, str] | None:
    """(entry, why) when ``key`` (an override's key) is, or lies in, or contains a refused entry."""
    for entry, why in REFUSED.items():
        section = entry.endswith(".")
        if key == entry.rstrip(".") or (section and key.startswith(entry)) or entry.startswith(key + "."):
            return entry.rstrip("."), why
    return None
