"""safetensors files: tensors read by slice through the `safetensors` library, exports streamed out.

Reading (`read_safetensors_header`, `scan_safetensors`, `StoredTensor.read`) is the library's
`safe_open`: its header validation (offsets, sizes, overlaps), then `get_slice(name)[rows]`, which
copies only those rows out of a map of the file that is closed again after each read (so the pages
read never stay counted in the process's memory). Its refusals are re-raised as `CheckpointError`
naming the file, and the tensor where the file is cut short. Small in-memory writes
(`save_safetensors`) are `safetensors.numpy.save_file`; exports are written by `write_safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gptoss_jax.checkpoint.files import INDEX_FILE, CheckpointError, describe, write_json

FORMAT_METADATA = {"format": "pt"}
"""The `__metadata__` every written file carries (what transformers expects of a torch checkpoint)."""
FLOAT_CODES = ("F32", "BF16", "F16", "F64")
"""safetensors dtype names a float weight may be stored in."""


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    file: Path
    dtype_code: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]

    def read(self, rows: slice | None = None) -> np.ndarray:
        """The tensor, or rows `rows` (step 1) of its first axis, read from disk into new memory
        (bfloat16 as ml_dtypes.bfloat16)."""
        try:
            with safe_open(self.file, framework="np") as f:
                if rows is None:
                    return f.get_tensor(self.name)
                start, stop = rows.indices(self.shape[0])[:2]
                return f.get_slice(self.name)[start:max(start, stop)]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.file}: reading tensor {self.name!r} failed ({describe(err)})") from err


def read_safetensors_header(file: Path) -> dict[str, StoredTensor]:
    """{name: StoredTensor} from a safetensors file's header; CheckpointError (naming the file, and
    the tensor a truncated file cuts) for a truncated or corrupt file. Reads the header only."""
    try:
        with safe_open(file, framework="np") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: StoredTensor(name, file, s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except SafetensorError as err:
        raise CheckpointError(_refusal(file, err)) from None


def _refusal(file: Path, err: SafetensorError) -> str:
    """The library's refusal of `file` said with what it concerns. For a truncated file the library
    says only "incomplete metadata": the header (8-byte length, JSON) is read here to name the first
    tensor the file cuts short."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"{file}: truncated or not a safetensors file ({size} bytes, no header)"
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, 100 << 20):
            return (f"{file}: truncated or corrupt safetensors file: header length {length} does not fit in "
                    f"the file's {size} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        ends = sorted((8 + length + int(entry["data_offsets"][1]), name) for name, entry in header.items()
                      if name != "__metadata__")
    except Exception:  # whatever is wrong with it, the library's words say it
        ends = []
    cut = [(end, name) for end, name in ends if end > size]
    if cut:
        return f"{file}: truncated: tensor {cut[0][1]!r} ends at byte {cut[0][0]}, the file has {size} bytes"
    return f"{file}: corrupt safetensors header ({err})"


def scan_safetensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `directory`: the files named by `model.safetensors.index.json`
    when present (each tensor checked to be where the index says), else every `*.safetensors` file."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({err!r})") from None
    else:
        weight_map, files = None, sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    tensors: dict[str, StoredTensor] = {}
    for file_name in files:
        path = directory / file_name
        if not path.is_file():
            raise CheckpointError(f"{index_path}: lists file {file_name!r}, which does not exist in {directory}")
        for name, tensor in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is also in {tensors[name].file.name}")
            if weight_map is not None and weight_map.get(name) != file_name:
                where = f"places in {weight_map[name]!r}" if name in weight_map else "does not list"
                raise CheckpointError(f"{path}: holds tensor {name!r}, which {INDEX_FILE} {where}")
            tensors[name] = tensor
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{directory / weight_map[absent[0]]}: does not hold tensor {absent[0]!r}, "
                                  f"which {INDEX_FILE} places there ({len(absent)} such tensors)")
    return tensors


def load_safetensors(directory_or_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, or of a checkpoint directory (index or *.safetensors), in
    memory (small checkpoints, tests); bfloat16 as ml_dtypes.bfloat16."""
    path = Path(directory_or_file)
    stored = scan_safetensors(path) if path.is_dir() else read_safetensors_header(path)
    return {name: tensor.read() for name, tensor in stored.items()}


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes in-memory arrays (any numpy dtype safetensors has, bfloat16 included) to one file."""
    save_file({name: np.ascontiguousarray(a) for name, a in tensors.items()}, path, metadata=FORMAT_METADATA)


# ---------------------------------------------------------------------------------------------
# Streaming writer. Hand-written because the library cannot stream: `save_file` / `serialize_file`
# take every tensor of a file in memory at once (a 4 GiB shard of an export, 13.8 GB for gpt-oss-20b
# unsharded), while an export must hold one expert / layer / row chunk at a time. The format written
# is the library's: an 8-byte little-endian header length, the JSON header (padded to 8 bytes), the
# tensors' bytes back to back in header order; tests read every export back with `safe_open`.

_DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8",
                np.dtype(ml_dtypes.bfloat16): "BF16"}


@dataclasses.dataclass
class OutTensor:
    """One tensor of a file to write: its header entry and a generator of its bytes, in order."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(tensors: list[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": FORMAT_METADATA}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": _DTYPE_CODES[np.dtype(tensor.dtype)], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, tensors: list[OutTensor], on_written: Callable[[int], None] = lambda n: None
                      ) -> None:
    """Writes a safetensors file tensor by tensor, chunk by chunk (never a whole tensor in memory
    unless it comes as one chunk)."""
    with open(path, "wb") as f:
        f.write(_header(tensors))
        for tensor in tensors:
            written = 0
            for chunk in tensor.chunks():
                chunk = np.ascontiguousarray(chunk, dtype=tensor.dtype)
                f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
                on_written(chunk.nbytes)
            if written != tensor.nbytes:
                raise AssertionError(f"{tensor.name}: wrote {written} bytes, expected {tensor.nbytes}")


def _group_into_files(plan: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    files: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in plan:
        if files[-1] and size + tensor.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(tensor)
        size += tensor.nbytes
    return files


def write_sharded_safetensors(directory: Path, tensors: list[OutTensor], max_shard_bytes: int,
                              on_written: Callable[[int], None] = lambda n: None) -> list[str]:
    """Writes `tensors` in order into `model.safetensors`, or, beyond `max_shard_bytes`, into
    `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`. Returns the file names."""
    files = _group_into_files(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    for file_name, group in zip(names, files):
        write_safetensors(directory / file_name, group, on_written)
    if len(files) > 1:
        weight_map = {t.name: file_name for file_name, group in zip(names, files) for t in group}
        total = sum(t.nbytes for t in tensors)
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
