"""Reading public datasets from the HuggingFace hub as parquet files.

Every hub dataset has an auto-converted parquet copy on its ``refs/convert/parquet``
branch, laid out as ``<config>/<split>/*.parquet``; ``huggingface_hub``'s fsspec file system
lists and streams those files, so nothing needs the ``datasets`` library or a full download.
"""

from __future__ import annotations

from typing import IO

from luffy.data.schema import DataError

PARQUET_REVISION = "refs/convert/parquet"


def parquet_files(dataset: str, config: str | None, split: str, what: str) -> list[str]:
    """``hf://`` paths of a dataset split's parquet files; a DataError naming the dataset (and
    the way around it: a local copy) when the hub cannot be reached or has no such split."""
    from huggingface_hub import HfFileSystem

    pattern = f"datasets/{dataset}@{PARQUET_REVISION}/{config or 'default'}/{split}/*.parquet"
    try:
        files = sorted(HfFileSystem().glob(pattern))
    except Exception as err:  # offline, gated, renamed
        raise DataError(f"{what}: cannot read {dataset} ({config or 'default'}/{split}) from the HuggingFace hub "
                        f"({type(err).__name__}: {err}); use a local copy instead") from None
    if not files:
        raise DataError(f"{what}: {dataset} has no parquet files for {config or 'default'}/{split} on the hub")
    return [f"hf://{f}" for f in files]


def open_file(path: str) -> IO[bytes]:
    """A local file or an ``hf://`` path, opened for binary reading."""
    if path.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return HfFileSystem().open(path[len("hf://"):], "rb")
    return open(path, "rb")
