import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent
# The `luffy` and `snakemake` commands of this environment, for subprocess-level tests.
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from tier_guard import TierGuard, add_options, is_xdist_worker  # noqa: E402  (tests/helpers, just put on the path)

pytest_plugins = ("pytester",)  # tests/test_tier_guard.py runs small suites of its own

# What needs the slow tier, by the marker naming what a test runs (pyproject.toml describes each).
SLOW_FAMILIES = ("verl_e2e", "slurm", "slurm_multinode", "browser", "solo")
# The order of test files, longest first, so that `make test-all`'s parallel part (pytest-xdist,
# one file per worker at a time) starts the two longest families at once, one per worker, and
# does not end on one long file: files with a test of the first family here come first, then
# the next; the rest keep their order. SLURM's file first: its waits leave a core to verl's.
LONG_FIRST = ("slurm", "verl_e2e", "slow")


def pytest_addoption(parser):
    add_options(parser)


def pytest_configure(config):
    if not is_xdist_worker(config):  # under pytest-xdist the controller sees every report and judges
        config.pluginmanager.register(TierGuard(config), "tier_guard")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A test of a slow family is in the slow tier, whether or not it says so itself (before
    ``-m "not slow"`` deselects); files with long tests run first (``LONG_FIRST``), each file's
    tests together and in their order."""
    for item in items:
        if any(item.get_closest_marker(family) for family in SLOW_FAMILIES):
            item.add_marker(pytest.mark.slow)
    rank: dict[str, int] = {}
    for item in items:
        mine = next((i for i, family in enumerate(LONG_FIRST) if item.get_closest_marker(family)), len(LONG_FIRST))
        rank[item.path] = min(rank.get(item.path, mine), mine)
    items.sort(key=lambda item: rank[item.path])  # stable: files and tests otherwise in collection order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A small untrained tiny model exported with the shipped tokenizer (seconds)."""
    from luffy.config import TinyModelConfig
    from luffy.models.export import export_verified
    from luffy.models.tiny import build_tiny_model
    from luffy.models.tokenizer import load_shipped_tokenizer

    out = tmp_path_factory.mktemp("models") / "tiny"
    tokenizer = load_shipped_tokenizer()
    # head_dim 32: vLLM's CPU attention supports 32, 64, ... but not 16
    model = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64), tokenizer)
    export_verified(model, tokenizer, out)
    return str(out)


def write_train_parquet(path: Path, n_train: int, max_chars: int = 80, system_prompt: str = "S") -> str:
    """A LUFFY training parquet from the toy task (trace length counted in characters)."""
    from luffy.config import ToyTaskConfig
    from luffy.data.toy import make_toy_data
    from luffy.data.traces import filter_traces

    raw = make_toy_data(ToyTaskConfig(n_train=n_train, n_pretrain=1, n_eval_id=1, n_eval_ood=1),
                        system_prompt).raw_traces
    rows, _ = filter_traces(raw, lambda texts: [len(t) for t in texts], max_chars, system_prompt, "toy")
    rows.to_parquet(path)
    return str(path)


@pytest.fixture(scope="session")
def train_parquet(tmp_path_factory):
    """Factory: train_parquet(n_train, max_chars=80) -> path of a fresh training parquet."""
    return lambda n_train, max_chars=80: write_train_parquet(
        tmp_path_factory.mktemp("train") / "train.parquet", n_train, max_chars)


@pytest.fixture
def loop():
    """One event loop for the whole test, current while verl's objects are built: they keep the
    loop they find, as in a Ray actor, whose methods all run on one loop."""
    event_loop = asyncio.new_event_loop()
    asyncio.set_event_loop(event_loop)
    yield event_loop
    asyncio.set_event_loop(None)
    event_loop.close()
