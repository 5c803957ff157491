"""Shapes a checkpoint takes for a config: the params' (typed weights included) and the dense HF tensors'.

Everything here comes from the model's declarations (`abstract_params`, `axes.EXPERT_MATRICES`) and
the quantized weight types (`gptoss_jax.quant`), cached per config: readers, conversion and export
ask here whether a param leaf is a part of a quantized weight, instead of matching names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4, quant
from gptoss_jax.axes import EXPERT_MATRICES, LAYERS
from gptoss_jax.checkpoint.files import CheckpointError
from gptoss_jax.config import Config
from gptoss_jax.params import abstract_params, flatten, hf_names, hf_tensor, key_name

ParamPath = tuple[str, ...]
Box = tuple[slice, ...]


@functools.lru_cache(maxsize=None)
def abstract_flat(config: Config, dtype: Any) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """{param leaf path: ShapeDtypeStruct} (cached: building it traces the model). A quantized
    weight's parts are leaves of their own, e.g. `layers/full/mlp/gate_up/blocks`."""
    return flatten(abstract_params(config, dtype))


@functools.lru_cache(maxsize=None)
def quantized_weights(config: Config) -> dict[ParamPath, quant.QuantizedWeight]:
    """{weight path: the quantized weight (parts as ShapeDtypeStructs)} of `config`'s params, e.g.
    `layers/full/mlp/gate_up` -> MXFP4Weight(blocks, scales); empty for dense experts."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(config, jnp.float32), is_leaf=quant.is_quantized)[0]
    return {tuple(key_name(k) for k in path): leaf for path, leaf in leaves if quant.is_quantized(leaf)}


def quantized_part(config: Config, path: ParamPath) -> tuple[ParamPath, str] | None:
    """(weight path, part name) when leaf `path` is a part of a quantized weight (`.../gate_up/blocks`
    -> (`.../gate_up`, "blocks")), None for any other param leaf."""
    return (path[:-1], path[-1]) if path[:-1] in quantized_weights(config) else None


def part_paths(config: Config, path: ParamPath) -> dict[str, ParamPath]:
    """{part name: leaf path} of the quantized weight at `path`."""
    weight = quantized_weights(config)[path]
    return {field.name: (*path, field.name) for field in dataclasses.fields(weight)}


def is_expert_matrix(path: ParamPath) -> bool:
    """Whether `path` is a per-expert matrix [pairs, E, in, out] (dense, or the quantized weight of one)."""
    return path[0] == LAYERS and path[-1] in EXPERT_MATRICES


def per_expert(config: Config, path: ParamPath) -> bool:
    """Whether leaf `path` is stored expert by expert: an expert matrix, or a part of a quantized one."""
    return is_expert_matrix(path) or quantized_part(config, path) is not None


def released_mxfp4_shapes(dense: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the released (file) layout's blocks [E, out, in/32, 16] and scales [E, out, in/32] of
    a dense expert weight [E, in, out]: `MXFP4Weight.part_shapes` with the block's bytes last."""
    parts = quant.MXFP4Weight.part_shapes(dense)
    *lead, block_bytes, groups = parts.blocks
    return (*lead, groups, block_bytes), tuple(parts.scales)


def with_expert_format(config: Config, expert_format: str, where: Any) -> Config:
    """`config` with `expert_format`; CheckpointError naming `where` when MXFP4 cannot hold its experts."""
    if expert_format == "mxfp4" and (config.hidden % mxfp4.BLOCK_SIZE or config.intermediate % mxfp4.BLOCK_SIZE):
        raise CheckpointError(
            f"{where}: keep_mxfp4 (--keep-mxfp4) needs hidden_size ({config.hidden}) and intermediate_size "
            f"({config.intermediate}) to be multiples of {mxfp4.BLOCK_SIZE}, the MXFP4 block size; keep the "
            "experts dense (without keep_mxfp4) for this config")
    return dataclasses.replace(config, expert_format=expert_format)


@functools.lru_cache(maxsize=None)
def dense_hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor of a dense Hugging Face checkpoint for `config` (whatever its
    expert_format), in file order."""
    abstract = abstract_flat(dataclasses.replace(config, expert_format="dense"), jnp.float32)
    shapes = {}
    for name in hf_names(config):
        entry = hf_tensor(config, name)
        target = abstract[entry.path]
        one = target.shape[1:] if entry.layer_pair is not None else target.shape
        shapes[name] = tuple(jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(one, jnp.float32)).shape)
    return shapes


def normalize_box(index: Sequence[slice], shape: tuple[int, ...]) -> Box:
    return tuple(slice(*s.indices(dim)[:2]) for s, dim in zip(index, shape))


def whole(shape: tuple[int, ...]) -> Box:
    """The box of every index of `shape`."""
    return tuple(slice(0, d) for d in shape)


def swap_last_axes(values: np.ndarray) -> np.ndarray:
    """values [..., m, n] -> contiguous [..., n, m], transposed in cache-sized tiles (numpy's plain
    transpose copy of a 5760 x 2880 matrix is ~10x slower)."""
    out = np.empty((*values.shape[:-2], values.shape[-1], values.shape[-2]), values.dtype)
    bits = np.dtype(f"u{values.dtype.itemsize}")
    src, dst = values.view(bits), out.view(bits)
    tile = 256
    for start in range(0, values.shape[-2], tile):
        dst[..., start:start + tile] = np.swapaxes(src[..., start:start + tile, :], -1, -2)
    return out
