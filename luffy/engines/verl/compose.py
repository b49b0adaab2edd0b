"""Compose and validate verl's own configs with our overrides, as ``main_ppo`` / the SFT trainer
would (seconds, CPU only): the preflight of a verl run, and what the tests hold every shipped
verl experiment to."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig

from luffy.engines.base import EngineError

PPO_CONFIG, SFT_CONFIG = "ppo_trainer", "sft_trainer_engine"


class VerlConfigError(EngineError):
    """verl refuses the composed config; the message is verl's (or Hydra's)."""


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """verl's config ``config_name`` with ``overrides`` applied (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="verl.trainer.config", version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except Exception as err:  # Hydra raises several types (unknown key, bad value, missing default)
        raise VerlConfigError(f"verl's {config_name} config refuses the overrides: {err}") from None


def validated_ppo(overrides: Sequence[str]) -> DictConfig:
    """The composed ``ppo_trainer`` config after verl's own checks: ``validate_config`` (what
    ``main_ppo`` runs first), the dataclass conversions the workers do, and the reward
    workers' loading of our reward function."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    config = compose(PPO_CONFIG, overrides)
    try:
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        for section in (config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout, config.algorithm):
            omega_conf_to_dataclass(section)
        get_custom_reward_fn(config)  # the reward workers load our function this way
    except Exception as err:  # verl's checks are asserts and ValueErrors
        raise VerlConfigError(f"verl's config validation refuses the run: {type(err).__name__}: {err}") from None
    return config


def validated_sft(overrides: Sequence[str]) -> DictConfig:
    """The composed ``sft_trainer_engine`` config after the dataclass conversions its trainer does."""
    from verl.utils.config import omega_conf_to_dataclass

    config = compose(SFT_CONFIG, overrides)
    try:
        for section in (config.model, config.engine, config.optim, config.checkpoint):
            omega_conf_to_dataclass(section)
    except Exception as err:
        raise VerlConfigError(f"verl's SFT config validation refuses the run: {type(err).__name__}: {err}") from None
    return config
