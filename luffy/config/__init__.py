"""Structured configuration: one dataclass per section, loaded and validated with OmegaConf.

The YAML files in ``config/`` override these defaults. Unknown keys and values of the wrong
type are errors that name the key (``ConfigError``). ``experiments`` maps a name to a
``TrainConfig``; each experiment is merged over ``train_defaults`` so a config states the
shared budget once and each experiment only what differs.

The package, along its jobs (each module imports only those above it):

- ``engines``: the training engines' names and what each cannot do (plain data);
- ``checking``: ``Valid`` ranges, ``ConfigError``, type and range checks, raw layers merged;
- ``sections``: the section dataclasses and the names they choose from;
- ``rules``: rules across settings;
- ``resolution``: ``load_config`` -> ``ResolvedConfig`` (seeds, resources, benchmark registry);
- ``docs``: the JSON schema in ``workflow/schemas/config.schema.yaml`` (``luffy schema``) and
  config/README.md's settings reference (``luffy settings``), so there is one source of truth.

Every public name is importable from ``luffy.config`` itself.
"""

from luffy.config.checking import *  # noqa: F401,F403
from luffy.config.docs import *  # noqa: F401,F403
from luffy.config.engines import ENGINE_NAMES, unsupported_settings  # noqa: F401
from luffy.config.resolution import *  # noqa: F401,F403
from luffy.config.rules import *  # noqa: F401,F403
from luffy.config.sections import *  # noqa: F401,F403
