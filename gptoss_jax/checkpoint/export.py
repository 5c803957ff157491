"""export_checkpoint: any checkpoint streamed out as Hugging Face safetensors (dense, or MXFP4 experts)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gptoss_jax import mxfp4 as mxfp4_codec
from gptoss_jax.checkpoint.files import (CHUNK_BYTES, CONFIG_FILE, CheckpointError, atomic_directory,
                                         check_destination, check_float_dtype, describe, write_json)
from gptoss_jax.checkpoint.layout import (Box, ParamPath, abstract_flat, dense_hf_shapes, is_expert_matrix,
                                          part_paths, quantized_weights, released_mxfp4_shapes, swap_last_axes, whole)
from gptoss_jax.checkpoint.readers import ExpertFormatView, ParamReader, SourceParams, open_params
from gptoss_jax.checkpoint.safetensors_io import OutTensor, write_sharded_safetensors
from gptoss_jax.config import Config
from gptoss_jax.params import hf_tensor

DEFAULT_MAX_SHARD_BYTES = 4 << 30
"""`export_checkpoint` starts a new safetensors file beyond this many bytes."""
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                               "model.embed_tokens", "lm_head"],
}


def _export_plan(reader: ParamReader, dtype: np.dtype, quantize: bool) -> list[OutTensor]:
    """Every tensor of the exported checkpoint, in Hugging Face order (MXFP4: blocks, then scales).
    `reader`'s experts must be dense unless `quantize` (quantized ones are then written as they are)."""
    config = reader.config
    quantized = quantized_weights(config)
    plan = []
    for name, shape in dense_hf_shapes(config).items():
        entry = hf_tensor(config, name)
        if quantize and entry.path in quantized:
            plan.extend(_mxfp4_copied_tensors(reader, name, entry.path, entry.layer_pair, shape))
        elif quantize and is_expert_matrix(entry.path):
            plan.extend(_mxfp4_out_tensors(reader, name, entry.path, entry.layer_pair, shape))
        elif entry.layer_pair is None:
            plan.append(OutTensor(name, dtype, shape, functools.partial(_global_chunks, reader, entry.path,
                                                                          shape, dtype)))
        elif is_expert_matrix(entry.path):
            plan.append(OutTensor(name, dtype, shape, functools.partial(_expert_chunks, reader, entry.path,
                                                                          entry.layer_pair, shape, dtype)))
        else:
            plan.append(OutTensor(name, dtype, shape, functools.partial(_layer_chunks, reader, name,
                                                                          entry.layer_pair, dtype)))
    return plan


def _global_chunks(reader: ParamReader, path: ParamPath, shape: tuple[int, ...], dtype: np.dtype
                   ) -> Iterator[np.ndarray]:
    """embed / unembed / final norm, <= CHUNK_BYTES of rows at a time (HF layout == param layout)."""
    rows = max(1, CHUNK_BYTES // max(1, math.prod(shape[1:]) * 4))
    for start in range(0, shape[0], rows):
        yield reader.read_box(path, (slice(start, min(start + rows, shape[0])), *whole(shape[1:]))).astype(dtype)


def _one_expert(pair: int, expert: int, shape: tuple[int, ...]) -> Box:
    """The box of one expert of layer pair `pair` in a leaf [pairs, E, *shape]."""
    return (slice(pair, pair + 1), slice(expert, expert + 1), *whole(shape))


def _expert_matrix(reader: ParamReader, path: ParamPath, pair: int, expert: int, shape: tuple[int, ...]
                   ) -> np.ndarray:
    """One expert's matrix [in, out] (`shape` is the HF tensor's [E, in, out])."""
    return reader.read_box(path, _one_expert(pair, expert, shape[1:]))[0, 0]


def _expert_chunks(reader: ParamReader, path: ParamPath, pair: int, shape: tuple[int, ...], dtype: np.dtype
                   ) -> Iterator[np.ndarray]:
    for expert in range(shape[0]):
        yield _expert_matrix(reader, path, pair, expert, shape).astype(dtype)


def _layer_chunks(reader: ParamReader, name: str, pair: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    entry = hf_tensor(reader.config, name)
    leaf_shape = abstract_flat(reader.config, jnp.float32)[entry.path].shape[1:]
    box = (slice(pair, pair + 1), *whole(leaf_shape))
    yield np.ascontiguousarray(entry.to_hf(reader.read_box(entry.path, box)[0])).astype(dtype)


def _mxfp4_pair(name: str, shape: tuple[int, ...], blocks: Callable[[], Iterator[np.ndarray]],
                scales: Callable[[], Iterator[np.ndarray]]) -> list[OutTensor]:
    """`NAME_blocks` and `NAME_scales` (the released layout) of the dense expert weight NAME [E, in, out]."""
    blocks_shape, scales_shape = released_mxfp4_shapes(shape)
    u8 = np.dtype(np.uint8)
    return [OutTensor(f"{name}_blocks", u8, blocks_shape, blocks), OutTensor(f"{name}_scales", u8, scales_shape, scales)]


def _mxfp4_out_tensors(reader: ParamReader, name: str, path: ParamPath, pair: int, shape: tuple[int, ...]
                       ) -> list[OutTensor]:
    """One layer's dense expert weight quantized one expert at a time; the blocks pass stashes the
    scales, which are written right after."""
    stash: list[np.ndarray] = []

    def blocks() -> Iterator[np.ndarray]:
        stash.clear()
        for expert in range(shape[0]):
            matrix = _expert_matrix(reader, path, pair, expert, shape)  # [in, out]
            expert_blocks, expert_scales = mxfp4_codec.quantize(swap_last_axes(matrix))  # [out, in/32, 16], [out, in/32]
            stash.append(expert_scales)
            yield expert_blocks

    def scales() -> Iterator[np.ndarray]:
        assert len(stash) == shape[0], "scales are written right after their blocks"
        yield np.stack(stash)

    return _mxfp4_pair(name, shape, blocks, scales)


def _mxfp4_copied_tensors(reader: ParamReader, name: str, path: ParamPath, pair: int, shape: tuple[int, ...]
                          ) -> list[OutTensor]:
    """One layer's MXFP4Weight, one expert at a time, its parts' bytes as they are (blocks back in the
    released layout)."""
    parts = part_paths(reader.config, path)

    def chunks(part: str) -> Iterator[np.ndarray]:
        leaf_shape = abstract_flat(reader.config, np.float32)[parts[part]].shape[2:]
        for expert in range(shape[0]):
            value = reader.read_box(parts[part], _one_expert(pair, expert, leaf_shape))[0, 0]
            yield mxfp4_codec.to_released_layout(value) if part == "blocks" else value

    return _mxfp4_pair(name, shape, functools.partial(chunks, "blocks"), functools.partial(chunks, "scales"))


def exported_config_dict(config: Config, dtype: Any, quantized: bool) -> dict[str, Any]:
    """config.json of an exported Hugging Face checkpoint (with quantization_config when MXFP4)."""
    hf = {**config.to_hf_dict(), "dtype": np.dtype(dtype).name}
    hf["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": hf["rope_theta"]}  # transformers >= 5 reads this
    if quantized:
        hf["quantization_config"] = dict(MXFP4_QUANTIZATION_CONFIG)
    return hf


def export_checkpoint(dst: str | os.PathLike, out: str | os.PathLike, mxfp4: bool = False, force: bool = False,
                      *, dtype: Any = jnp.bfloat16, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True) -> Path:
    """Writes the checkpoint `dst` (converted, or any source `convert_checkpoint` takes) to OUT in
    Hugging Face layout: config.json + `model.safetensors`, or `model-0000i-of-0000n.safetensors` files
    of <= `max_shard_bytes` with `model.safetensors.index.json`. Weights in `dtype` (bfloat16 by
    default); with `mxfp4`, the expert matrices as MXFP4 (`*_blocks` / `*_scales`, and
    quantization_config in config.json): MXFP4 experts (a `--keep-mxfp4` checkpoint's MXFP4Weights, an
    MXFP4 source) written byte for byte as they are, dense ones quantized. Without `mxfp4`, MXFP4
    experts are dequantized to dense. Streaming (one expert / layer / row chunk at a time) and atomic
    like `convert_checkpoint`. Returns OUT.
    """
    dtype = check_float_dtype(dtype)
    out = Path(out).expanduser().absolute()
    check_destination(Path(dst).expanduser(), out, force)
    reader = open_params(dst)
    if mxfp4 and isinstance(reader, SourceParams) and reader.source.quantized:
        reader = SourceParams(reader.source, np.float32, "mxfp4")  # copy the source's bytes
    elif not mxfp4 and quantized_weights(reader.config):
        reader = ExpertFormatView(reader, "dense", dtype)
    plan = _export_plan(reader, dtype, mxfp4)
    total = sum(t.nbytes for t in plan)
    with atomic_directory(out, force) as tmp, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                     desc=f"export {out.name}", disable=not progress) as bar:
        try:
            write_sharded_safetensors(tmp, plan, max_shard_bytes, bar.update)
            write_json(tmp / CONFIG_FILE, exported_config_dict(reader.config, dtype, mxfp4))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{out}: exporting failed ({describe(err)}); nothing was written there") from err
    return out
