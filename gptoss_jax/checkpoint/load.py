"""load_model: a converted checkpoint or a source, read straight into the params' shardings."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.checkpoint.files import CHUNK_BYTES, check_float_dtype
from gptoss_jax.checkpoint.layout import Box, ParamPath, normalize_box, with_expert_format
from gptoss_jax.checkpoint.readers import (ExpertFormatView, OrbaxParams, ParamReader, SourceParams, converted_dtype,
                                           is_converted)
from gptoss_jax.checkpoint.sources import open_source
from gptoss_jax.config import Config, load_config
from gptoss_jax.model import Params
from gptoss_jax.ops import parallel
from gptoss_jax.params import abstract_params, flatten, unflatten


def load_model(dst: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, *,
               shardings: Params | None = None, keep_mxfp4: bool | None = None) -> tuple[Config, Params]:
    """(config, params) from a converted checkpoint, restored straight into their shardings.

    `dst` is a converted checkpoint (Orbax restore into `jax.ShapeDtypeStruct` targets; `dtype` None
    keeps the stored dtype, else weights are cast on restore), or any source `convert_checkpoint`
    takes, loaded directly without a temporary copy: each device's shard is read from the safetensors
    files (MXFP4 dequantized) by `jax.make_array_from_callback`; `dtype` None means bfloat16 then.
    Norm scales are always float32.

    Experts: `keep_mxfp4` None keeps them as the checkpoint holds them (a converted checkpoint: dense
    or MXFP4 as its config.json says; a source: dense). True gives MXFP4 experts (`config.expert_format`
    "mxfp4"; `gate_up` / `down` are `quant.MXFP4Weight`s whose uint8 `.blocks` / `.scales` are never
    cast to `dtype`): an MXFP4 source's bytes copied as `convert_checkpoint(keep_mxfp4=True)` would
    store them, dense weights quantized. False gives dense experts in `dtype`, MXFP4 ones dequantized
    on load.

    Shardings: `shardings` (a pytree of `jax.sharding.Sharding` shaped like the params) when given;
    else `gptoss_jax.sharding.param_shardings(config, mesh)` with a `mesh`; else all on one device.
    """
    path = Path(dst).expanduser()
    converted = is_converted(path)
    if converted:
        stored_config = load_config(path)
        dtype = check_float_dtype(converted_dtype(path) if dtype is None else dtype)
    else:
        source = open_source(path)
        stored_config, dtype = source.config, check_float_dtype(jnp.bfloat16 if dtype is None else dtype)
    expert_format = stored_config.expert_format if keep_mxfp4 is None else ("mxfp4" if keep_mxfp4 else "dense")
    config = with_expert_format(stored_config, expert_format, path)
    abstract = abstract_params(config, dtype)
    target_shardings = _param_shardings(config, abstract, mesh, shardings)
    if converted:
        # The Orbax checkpoint's arrays read box by box through tensorstore, not with Orbax's own
        # restore: that holds whole arrays in host buffers on top of the restored ones (gpt-oss-20b's
        # 12.6 GB of MXFP4 params took 21.4 GB of RAM, and kept it), this needs the params + ~256 MB.
        reader: ParamReader = OrbaxParams(path, stored_config)
        if expert_format != stored_config.expert_format:  # experts converted on the fly
            reader = ExpertFormatView(reader, expert_format, dtype)
    else:
        reader = SourceParams(source, dtype, expert_format)
    return config, _load_from_reader(reader, abstract, target_shardings)


def _param_shardings(config: Config, abstract: Params, mesh: jax.sharding.Mesh | None,
                     shardings: Params | None) -> Params:
    if shardings is not None:
        return shardings
    if mesh is not None:
        return parallel.param_shardings(config, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract)


def _load_from_reader(reader: ParamReader, abstract: Params, shardings: Params) -> Params:
    """Each param leaf as a jax.Array with its sharding, every shard read from `reader` directly, in
    slices of <= CHUNK_BYTES written into the shard's buffer in place (`_read_shard`): peak memory is
    the params plus a few slices, whatever the size of one weight. Typed weights rebuilt from `abstract`."""
    flat_shardings = flatten(shardings)

    def load(path: ParamPath, target: jax.ShapeDtypeStruct) -> jax.Array:
        shape, sharding = tuple(target.shape), flat_shardings[path]
        if isinstance(reader, OrbaxParams):
            reader.check_shape(path, shape)
        shards = [_read_shard(reader, path, normalize_box(index, shape), target.dtype, device)
                  for device, index in sharding.addressable_devices_indices_map(shape).items()]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    return unflatten({path: load(path, target) for path, target in flatten(abstract).items()}, like=abstract)


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def _read_shard(reader: ParamReader, path: ParamPath, box: Box, dtype: Any, device: jax.Device) -> jax.Array:
    """One shard (`box` of param `path`) on `device`: read whole when small, else allocated once and
    filled slice by slice along its first axis (donated, so updated in place)."""
    shape = tuple(s.stop - s.start for s in box)
    row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
    rows = max(1, CHUNK_BYTES // max(1, row_bytes))

    def read(start: int, stop: int) -> np.ndarray:
        first = box[0].start
        return reader.read_box(path, (slice(first + start, first + stop), *box[1:])).astype(dtype, copy=False)

    if not shape or rows >= shape[0]:
        return jax.device_put(read(0, shape[0]) if shape else reader.read_box(path, box).astype(dtype), device)
    buffer = jnp.zeros(shape, dtype, device=device)
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        buffer = _write_rows(buffer, jax.device_put(read(start, stop), device), np.int32(start))
    return buffer
