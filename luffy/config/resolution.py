"""Resolution: a raw config (Snakemake's ``config``) validated into a ``ResolvedConfig``: the
sections checked, the experiments merged over ``train_defaults`` and expanded per seed, the
suites filled from the benchmark registry; and the settings a job receives back from JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from luffy.config.checking import ConfigError, _merge
from luffy.config.rules import (_check_external_models, _check_file, _check_model_name, _check_report,
                                _check_resources, _check_sections, _check_verl, _looks_local, resolve_train_config)
from luffy.config.sections import (BENCHMARK_SOURCE_PREFIX, GRADERS_FOR, TOY_SOURCE_PREFIX, TOY_SPLITS,
                                   BenchmarkSpec, Config, EvaluationConfig, ExternalModelConfig, SuiteConfig,
                                   TrainConfig, seed_of)


@dataclass
class ResolvedConfig:
    """The validated configuration: typed sections plus the resolved experiments."""

    root: Config
    experiments: dict[str, TrainConfig]  # expanded: one entry per (experiment, seed)
    benchmarks: dict[str, BenchmarkSpec] = field(default_factory=dict)  # suite name -> its registry entry

    @property
    def seeded_base(self) -> bool:
        """Each seed pre-trains its own base model (``seed_scope: base`` with seeds)."""
        return bool(self.root.seeds) and self.root.seed_scope == "base"

    @property
    def base_models(self) -> list[str]:
        """'base', or one 'base-seed<N>' per seed when the seeds vary the base model too."""
        return [f"base-seed{seed}" for seed in self.root.seeds] if self.seeded_base else ["base"]

    def base_of(self, experiment: str) -> str:
        """The base model an (expanded) experiment's lineage starts from."""
        seed = seed_of(experiment)
        return f"base-seed{seed}" if self.seeded_base and seed is not None else "base"

    @property
    def own_models(self) -> list[str]:
        """The models this config makes: the base model(s), then every (expanded) experiment."""
        return [*self.base_models, *self.experiments]

    @property
    def external_models(self) -> dict[str, ExternalModelConfig]:
        return self.root.evaluation.models

    @property
    def models(self) -> list[str]:
        """Evaluated models: this config's own, then the external ones (``evaluation.models``)."""
        return [*self.own_models, *self.external_models]


def _expand_seeds(declared: dict[str, TrainConfig], seeds: list[int]) -> dict[str, TrainConfig]:
    for name, cfg in declared.items():
        if cfg.init_from is not None and cfg.init_from not in declared:
            raise ConfigError(f"config key 'experiments.{name}.init_from': '{cfg.init_from}' is not an experiment")
        seen, current = {name}, cfg.init_from
        while current is not None:
            if current in seen:
                raise ConfigError(f"config key 'experiments.{name}.init_from': cycle through '{current}'")
            seen.add(current)
            current = declared[current].init_from
    if not seeds:
        return declared
    expanded = {}
    for name, cfg in declared.items():
        for seed in seeds:
            run = dataclasses.replace(cfg, seed=seed)
            if cfg.init_from is not None:
                run.init_from = f"{cfg.init_from}-seed{seed}"  # each seed continues its own first stage
            expanded[f"{name}-seed{seed}"] = run
    return expanded


def load_config(raw: dict[str, Any] | DictConfig) -> ResolvedConfig:
    """Validate a raw config mapping (e.g. Snakemake's ``config``) and resolve experiments."""
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    root: Config = _merge(Config, raw or {})
    _check_sections(root)
    experiments = {}
    for name, overrides in root.experiments.items():
        _check_model_name(name, f"experiments.{name}")
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"config key 'experiments.{name}': expected a mapping of settings")
        experiments[name] = resolve_train_config(name, root.train_defaults or {}, overrides or {})
    if len(set(root.seeds)) != len(root.seeds):
        raise ConfigError(f"config key 'seeds': repeated seeds in {root.seeds}")
    if root.seed_scope is None:
        root.seed_scope = "base" if root.base_model.path is None else "training"
    if root.seed_scope == "base" and root.base_model.path is not None and root.seeds:
        raise ConfigError("config key 'seed_scope': 'base' re-seeds the pre-training of the tiny base model, but "
                          f"base_model.path ({root.base_model.path}) is a given model; use seed_scope: training")
    experiments_declared = list(experiments)
    experiments = _expand_seeds(experiments, list(root.seeds))
    _check_resources(root, experiments)
    _check_verl(root, experiments)
    ev = root.evaluation
    if not ev.suites:
        raise ConfigError("config key 'evaluation.suites': at least one suite is required")
    _check_external_models(ev.models, experiments_declared)
    benchmarks = {}
    registry: dict[str, BenchmarkSpec] | None = None  # read once, when a suite names a benchmark
    for name, suite in ev.suites.items():
        key = f"evaluation.suites.{name}"
        if suite.source.startswith(TOY_SOURCE_PREFIX):
            split = suite.source[len(TOY_SOURCE_PREFIX):]
            if split not in TOY_SPLITS:
                raise ConfigError(f"config key '{key}.source': toy split '{split}' is not one of {TOY_SPLITS}")
        elif suite.source.startswith(BENCHMARK_SOURCE_PREFIX):
            registry = load_registry(root.benchmarks) if registry is None else registry
            benchmarks[name] = _resolve_benchmark(registry, root.benchmarks, suite, key)
        else:
            _check_file(suite.source, f"{key}.source")
        resolve_suite(suite, benchmarks.get(name), key)
    _check_report(root, ["base", *experiments_declared])
    return ResolvedConfig(root=root, experiments=experiments, benchmarks=benchmarks)


def read_config_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's content; a missing file, a directory, bytes that are not UTF-8 and YAML
    syntax are one-line ``ConfigError``s naming the file (and the line and column)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path}: a directory, not a YAML file")
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{what} {path}: YAML syntax error{where}: {problem}") from None


def load_config_file(path: str | Path) -> ResolvedConfig:
    """``load_config`` of one YAML file (``luffy check-config``, ``luffy compare``)."""
    return load_config(read_config_file(path) or {})


def load_registry(path: str) -> dict[str, BenchmarkSpec]:
    """The benchmark registry: name -> validated ``BenchmarkSpec``."""
    _check_file(path, "benchmarks")
    raw = read_config_file(path, "benchmark registry")
    try:
        raw = OmegaConf.to_container(OmegaConf.create(raw), resolve=True) if isinstance(raw, dict) else raw
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise ConfigError(f"benchmark registry {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"benchmark registry {path}: expected a mapping name -> settings")
    out = {}
    for name, entry in raw.items():
        if str(name).startswith("_"):  # shared YAML anchors
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"benchmark registry {path}: '{name}': expected a mapping of settings")
        try:
            spec: BenchmarkSpec = _merge(BenchmarkSpec, entry, prefix=str(name))
        except ConfigError as err:
            raise ConfigError(f"benchmark registry {path}: {err}") from None
        if not spec.hub_id and not spec.local:
            raise ConfigError(f"benchmark registry {path}: '{name}.hub_id': a benchmark needs a hub_id or a local file")
        out[name] = spec
    return out


def _resolve_benchmark(registry: dict[str, BenchmarkSpec], registry_path: str, suite: SuiteConfig,
                       key: str) -> BenchmarkSpec:
    """The registry entry a 'benchmark:<name>' suite names, with the suite's local file applied."""
    name = suite.source[len(BENCHMARK_SOURCE_PREFIX):]
    if name not in registry:
        raise ConfigError(f"config key '{key}.source': benchmark '{name}' is not in {registry_path} "
                          f"(known: {sorted(registry)})")
    spec = dataclasses.replace(registry[name], columns=dict(registry[name].columns))
    if suite.local is not None:
        spec.local = suite.local
    if spec.local is not None and _looks_local(spec.local):
        _check_file(spec.local, f"{key}.local")
    return spec


def resolve_suite(suite: SuiteConfig, spec: BenchmarkSpec | None, key: str) -> None:
    """Fill a suite's null settings from its registry entry (or the defaults) and check them."""
    for field_name, fallback in (("n", 1), ("answer_type", "math"), ("group", "math")):
        if getattr(suite, field_name) is None:
            setattr(suite, field_name, getattr(spec, field_name) if spec else fallback)
    if suite.system_prompt is None:
        suite.system_prompt = "keep" if suite.source.startswith(TOY_SOURCE_PREFIX) else "drop"
    if suite.title is None and spec is not None and spec.title:
        suite.title = spec.title
    if suite.local is not None and spec is None:
        raise ConfigError(f"config key '{key}.local': only 'benchmark:<name>' sources take a local file")
    graders = GRADERS_FOR[suite.answer_type]
    if suite.grader is None:
        suite.grader = graders[0]
    if suite.grader not in graders:
        raise ConfigError(f"config key '{key}.grader': '{suite.grader}' does not grade {suite.answer_type} answers "
                          f"(one of {graders})")
    if suite.temperature == 0 and suite.n > 1:
        raise ConfigError(f"config key '{key}.temperature': 0 (greedy) gives {suite.n} identical samples; use n: 1 "
                          "or a temperature > 0")


def eval_job_settings(text: str) -> tuple[EvaluationConfig, tuple[str, ExternalModelConfig] | None]:
    """An evaluation job's ``--settings``: the shared settings and, for an external model, its
    name and settings (the ``external`` entry ``luffy.workflow.eval_settings`` adds)."""
    raw = json.loads(text)
    external = raw.pop("external", None)
    settings = _merge(EvaluationConfig, raw)
    if external is None:
        return settings, None
    name = external.pop("name")
    return settings, (name, _merge(ExternalModelConfig, external, prefix=f"evaluation.models.{name}"))
