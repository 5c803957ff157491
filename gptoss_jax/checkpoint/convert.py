"""convert_checkpoint: any source streamed into an Orbax checkpoint, one zarr chunk at a time, atomically."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from tqdm.auto import tqdm

from gptoss_jax.checkpoint.files import (CHUNK_BYTES, CONFIG_FILE, PARAMS_DIR, CheckpointError, atomic_directory,
                                         check_destination, check_float_dtype, describe, write_json)
from gptoss_jax.checkpoint.layout import Box, ParamPath, abstract_flat, per_expert
from gptoss_jax.checkpoint.readers import ParamReader, SourceParams
from gptoss_jax.checkpoint.sources import open_source
from gptoss_jax.config import Config
from gptoss_jax.params import unflatten


@dataclasses.dataclass
class _StreamedLeaf:
    """A param leaf Orbax saves by pulling its chunks from `reader` (see `_StreamedLeafHandler`)."""

    path: ParamPath
    shape: tuple[int, ...]
    dtype: np.dtype
    reader: ParamReader
    on_written: Callable[[int], None]

    @property
    def per_piece_axes(self) -> tuple[int, ...]:
        """Axes stored one index per chunk: the layer-pair axis, and the expert axis of expert matrices
        (dense, or the parts of a quantized one)."""
        if self.path[0] != "layers":
            return ()
        return (0, 1) if per_expert(self.reader.config, self.path) else (0,)


def _write_chunk(store: ts.TensorStore, box: Box, value: np.ndarray) -> ts.Future:
    """Starts writing `value` into `store[box]` (tests patch this to simulate a full disk)."""
    return store[box].write(value)


def _chunk_boxes(shape: tuple[int, ...], chunk: Sequence[int]) -> Iterator[Box]:
    """The boxes of a regular chunk grid over `shape`, in C order."""
    ranges = [range(0, dim, step) for dim, step in zip(shape, chunk)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(s, min(s + c, d)) for s, c, d in zip(starts, chunk, shape))


class _StreamedLeafHandler(ocp.type_handlers.NumpyHandler):
    """Saves `_StreamedLeaf`s exactly as Orbax saves numpy arrays (same specs, metadata and type name,
    so the checkpoint restores like any other), but one chunk at a time, leaf after leaf."""

    async def serialize(self, values: Sequence[_StreamedLeaf], infos: Sequence[Any], args: Any = None) -> list:
        for leaf, info in zip(values, infos):
            await info.await_path_creation()
            await self._write_leaf(leaf, info)
        return []

    async def _write_leaf(self, leaf: _StreamedLeaf, info: Any) -> None:
        save_args = ocp.type_handlers.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=leaf.per_piece_axes)
        spec = ocp.type_handlers.get_json_tspec_write(
            info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=leaf.shape, local_shape=leaf.shape,
            dtype=leaf.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
            arg=save_args)
        store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        in_flight: collections.deque[tuple[ts.Future, int]] = collections.deque()
        for box in _chunk_boxes(leaf.shape, store.chunk_layout.write_chunk.shape):
            value = leaf.reader.read_box(leaf.path, box)
            in_flight.append((_write_chunk(store, box, value), value.nbytes))
            del value
            while len(in_flight) > 2:
                await self._finish(in_flight.popleft(), leaf)
        while in_flight:
            await self._finish(in_flight.popleft(), leaf)

    @staticmethod
    async def _finish(write: tuple[ts.Future, int], leaf: _StreamedLeaf) -> None:
        future, nbytes = write
        await future
        leaf.on_written(nbytes)


def _save_streamed(directory: Path, reader: ParamReader, dtype: np.dtype, progress: bool, desc: str) -> None:
    """Writes the Orbax checkpoint `directory` (which must not exist) of every param `reader` gives."""
    abstract = abstract_flat(reader.config, dtype)
    total = sum(a.size * a.dtype.itemsize for a in abstract.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
        leaves = {path: _StreamedLeaf(path, tuple(a.shape), np.dtype(a.dtype), reader, bar.update)
                  for path, a in abstract.items()}
        registry = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler()), (_StreamedLeaf, _StreamedLeafHandler()))
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(directory, args=ocp.args.PyTreeSave(unflatten(leaves)))


def converted_config_dict(config: Config, dtype: Any) -> dict[str, Any]:
    """The config.json of a converted checkpoint: HF keys plus the params' storage dtype (and
    `expert_format` when the experts are not dense)."""
    extra = {"expert_format": config.expert_format} if config.expert_format != "dense" else {}
    return {**config.to_hf_dict(), "dtype": np.dtype(dtype).name, **extra}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = jnp.bfloat16,
                       force: bool = False, progress: bool = True, *, keep_mxfp4: bool = False) -> Path:
    """Converts a Hugging Face / OpenAI gpt-oss checkpoint (directory or Hub id) to DST (see the
    package doc, `gptoss_jax.checkpoint`).

    Streaming (peak memory a few chunks of <= 128 MiB), with a tqdm bar in bytes. Atomic: written to a
    temporary directory beside DST and renamed when complete; a failed conversion leaves no DST, and an
    existing DST is replaced only with `force` and only by a complete checkpoint. Weights are stored in
    `dtype` (float32, bfloat16 or float16), norm scales in float32. Returns DST.

    `keep_mxfp4` (`--keep-mxfp4`): the experts stay MXFP4: each expert matrix `gate_up` / `down` is an
    MXFP4Weight stored as its uint8 parts `.../gate_up/blocks` and `.../gate_up/scales` (config.json
    says `"expert_format": "mxfp4"`; `load_model` gives a model that runs on them). From an MXFP4 source
    their bytes are copied (relaid out, never dequantized); from a dense source the weights are quantized
    with `mxfp4.quantize` (lossy: values rounded to e2m1 with a shared power-of-two scale per 32). Needs
    hidden and intermediate sizes that are multiples of 32.

    Raises CheckpointError (a ValueError naming the file and tensor) for a bad source or a failed write
    (e.g. a full disk), FileExistsError when DST exists and not `force`.
    """
    dtype = check_float_dtype(dtype)
    dst = Path(dst).expanduser().absolute()
    check_destination(Path(src).expanduser(), dst, force)
    source = open_source(src)
    reader = SourceParams(source, dtype, "mxfp4" if keep_mxfp4 else "dense")
    with atomic_directory(dst, force) as tmp:
        try:
            _save_streamed(tmp / PARAMS_DIR, reader, dtype, progress, desc=f"convert {source.directory.name}")
            write_json(tmp / CONFIG_FILE, converted_config_dict(reader.config, dtype))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{dst}: writing the converted checkpoint failed ({describe(err)}); "
                                  "nothing was written there") from err
    return dst
