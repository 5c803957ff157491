"""What every checkpoint directory shares: its file names, the error type, JSON, atomic writes.

The lowest module of the package (imports nothing of it): the others raise `CheckpointError`, read
and write config.json with `read_json` / `write_json`, and write a directory with `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 128 << 20
"""Largest slice read or written at once: a zarr chunk of `convert_checkpoint`, a slice of a shard
in `load_model`, rows of the embeddings in `export_checkpoint` (one expert matrix of gpt-oss is 32-64 MiB)."""
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor."""


def describe(err: BaseException) -> str:
    """The error for a message; a full disk (OSError ENOSPC anywhere in the chain) said plainly."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return f"no space left on device: {cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(err).__name__}: {err}"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when missing or not one."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs its config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return raw


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def check_float_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def check_destination(src: Path | None, dst: Path, force: bool) -> None:
    """FileExistsError when `dst` exists and not `force`; CheckpointError when it and `src` nest."""
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (--force) to replace it")
    if src is not None and src.exists():
        src, resolved = src.resolve(), dst.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise CheckpointError(f"{dst}: the destination must not contain or be inside the source {src}")


@contextlib.contextmanager
def atomic_directory(dst: Path, force: bool) -> Iterator[Path]:
    """Yields an empty temporary directory beside `dst`; on success it becomes `dst` (replacing an
    existing one only with `force`, and only once complete); on any error it is deleted and an existing
    `dst` is left untouched."""
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (--force) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = dst.parent / f".{dst.name}.tmp-{tag}", dst.parent / f".{dst.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            if old.exists():
                os.replace(old, dst)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
