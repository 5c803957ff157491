"""Checkpoints: convert Hugging Face / OpenAI files to Orbax (streaming, atomic), load them sharded, export.

A converted checkpoint DST is a directory holding
- `DST/config.json`: the model's Hugging Face config (`Config.to_hf_dict()`) plus `"dtype"`, the
  dtype the weights were stored in (norm scales are always float32), and `"expert_format": "mxfp4"`
  for a checkpoint converted with `keep_mxfp4` (`--keep-mxfp4`);
- `DST/params/`: an ordinary Orbax PyTree checkpoint (OCDBT + zarr, zstd) of the params pytree, paths
  as in `params.py`. Restore it with `ocp.StandardCheckpointer().restore(DST / "params", target)`
  where `target` holds `jax.ShapeDtypeStruct`s with shardings (`load_model` does exactly that).
  With `keep_mxfp4`, each layer's experts are the uint8 params `gate_up_blocks` / `gate_up_scales` /
  `down_blocks` / `down_scales` (the model's in-memory MXFP4 layout, see `gptoss_jax.mxfp4`: the
  released bytes with a block's 16 bytes moved before the block index) instead of `gate_up` / `down`.

Sources (`convert_checkpoint(SRC, ...)`, also accepted by `load_model` and `export_checkpoint`):
- a Hugging Face directory: `config.json` + `model.safetensors`, or shards listed in
  `model.safetensors.index.json`; experts dense (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]) or
  MXFP4 (`*_blocks` uint8 [E, out, in/32, 16] + `*_scales` uint8 [E, out, in/32]);
- an OpenAI `original/` directory (`embedding.weight`, `block.N.attn.qkv.weight`, MXFP4
  `block.N.mlp.mlp1_weight.blocks` ...), with OpenAI's `config.json`. A directory holding both
  Hugging Face files and `original/` is read from the Hugging Face files;
- a Hub id (`openai/gpt-oss-20b`) when no such local directory exists: downloaded with
  `huggingface_hub.snapshot_download` (Hugging Face files only).

Every source is read through one view, `SourceCheckpoint.read(hf_name, rows)`: the tensor that a
dense Hugging Face checkpoint would hold under `hf_name`, rows `rows` of its first axis only (and, for
MXFP4 params, `SourceCheckpoint.read_mxfp4`: the stored bytes, or the dense weights quantized). The
map from there to param paths is `params.hf_tensor`.

Memory: conversion writes one zarr chunk at a time (one layer's slice, or one expert's matrix, or
<= 128 MiB of rows of the embeddings), reading only the bytes it needs from the safetensors files
(no mmap), with at most two chunk writes in flight: peak host memory is a few chunks, never the model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from tqdm.auto import tqdm

from gptoss_jax import mxfp4
from gptoss_jax.config import FULL, SLIDING, Config, from_hf_dict, load_config
from gptoss_jax.model import Params
from gptoss_jax.ops import parallel
from gptoss_jax.params import abstract_params, flatten, hf_names, hf_tensor, unflatten

ParamPath = tuple[str, ...]
Box = tuple[slice, ...]

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 128 << 20
"""Largest zarr chunk written by `convert_checkpoint` (one expert matrix of gpt-oss is 32-64 MiB)."""
DEFAULT_MAX_SHARD_BYTES = 4 << 30
"""`export_checkpoint` starts a new safetensors file beyond this many bytes."""
EXPERT_WEIGHTS = ("gate_up", "down")
"""Param names of the expert matrices, [pairs, E, in, out]: converted one expert at a time."""
MXFP4_PARTS = ("blocks", "scales")
"""With expert_format "mxfp4", expert matrix NAME is the uint8 params NAME_blocks [pairs, E, out, 16,
in/32] and NAME_scales [pairs, E, out, in/32] (in-memory layout, see `gptoss_jax.mxfp4`)."""
MXFP4_HF_NAMES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
"""Hugging Face weights stored as `NAME_blocks` + `NAME_scales` in MXFP4 checkpoints."""
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                               "model.embed_tokens", "lm_head"],
}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------
# safetensors files, read by hand: headers validated up front, data read by byte range

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor in a safetensors file: where its bytes are, and what they hold."""

    name: str
    file: Path
    dtype_code: str  # safetensors' name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def dtype(self) -> np.dtype | None:
        return _SAFETENSORS_DTYPES.get(self.dtype_code)

    def read(self, rows: slice | None = None) -> np.ndarray:
        """The tensor, or rows `rows` (step 1) of its first axis, read from disk into new memory."""
        dtype = self.dtype
        assert dtype is not None, self.dtype_code
        first, rest = (self.shape[0], self.shape[1:]) if self.shape else (1, ())
        start, stop = (0, first) if rows is None else rows.indices(first)[:2]
        row_bytes = math.prod(rest) * dtype.itemsize
        count = max(stop - start, 0) * row_bytes
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            data = f.read(count)
        if len(data) != count:
            raise CheckpointError(f"{self.file}: truncated: tensor {self.name!r} needs {count} bytes at offset "
                                  f"{self.offset + start * row_bytes}, the file ends first")
        array = np.frombuffer(bytearray(data), dtype=dtype)
        return array.reshape(self.shape if rows is None else (stop - start, *rest))


def read_safetensors_header(file: Path) -> dict[str, StoredTensor]:
    """{name: StoredTensor} from a safetensors file's header; CheckpointError (naming the file and
    tensor) for a truncated or corrupt file. Reads the header only."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file ({size} bytes, no header)")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file: header length {header_bytes} "
                                  f"does not fit in the file's {size} bytes")
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_bytes
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            code, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}: {entry!r}") from None
        itemsize = _SAFETENSORS_DTYPES[code].itemsize if code in _SAFETENSORS_DTYPES else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(f"{file}: corrupt safetensors header: tensor {name!r} ({code} {list(shape)}) "
                                  f"spans {end - begin} bytes, expected {math.prod(shape) * itemsize}")
        if data_start + end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"the file has {size} bytes")
        tensors[name] = StoredTensor(name, file, code, shape, data_start + begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{file}: corrupt safetensors header: tensors {first!r} and {second!r} overlap")
    return tensors


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


# ---------------------------------------------------------------------------------------------
# Source layouts: where each dense Hugging Face tensor comes from

@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How to read dense HF tensor rows from stored tensors.

    Plain: `stored[row_offset + rows]`. MXFP4 (`scales` set): `stored` is blocks [E, out, G, 16] and
    `scales` [E, out, G]; the dense rows are dequantize(...) [e, out, in] with the last axes swapped.
    """

    stored: str
    scales: str | None = None
    row_offset: int = 0
    stored_shape: tuple[int, ...] | None = None  # when the stored tensor is bigger than the dense one


@functools.lru_cache(maxsize=None)
def _abstract_flat(config: Config, dtype: Any) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """{param path: ShapeDtypeStruct} (cached: building it traces the model)."""
    return flatten(abstract_params(config, dtype))


def _mxfp4_leaf(path: ParamPath) -> tuple[ParamPath, str] | None:
    """(the expert matrix's path, "blocks") for the leaf `.../gate_up/blocks` (etc.) of an MXFP4 weight
    (`gptoss_jax.quant.MXFP4Weight`), None for any other param leaf."""
    matrix, part = path[:-1], path[-1]
    return (matrix, part) if path[0] == "layers" and matrix[-1] in EXPERT_WEIGHTS and part in MXFP4_PARTS else None


def _mxfp4_path(path: ParamPath, part: str) -> ParamPath:
    """The path of expert matrix `path`'s MXFP4 `part` ("blocks" or "scales")."""
    return (*path, part)


def _with_expert_format(config: Config, expert_format: str, where: Any) -> Config:
    """`config` with `expert_format`; CheckpointError naming `where` when MXFP4 cannot hold its experts."""
    if expert_format == "mxfp4" and (config.hidden % mxfp4.BLOCK_SIZE or config.intermediate % mxfp4.BLOCK_SIZE):
        raise CheckpointError(
            f"{where}: keep_mxfp4 (--keep-mxfp4) needs hidden_size ({config.hidden}) and intermediate_size "
            f"({config.intermediate}) to be multiples of {mxfp4.BLOCK_SIZE}, the MXFP4 block size; keep the "
            "experts dense (without keep_mxfp4) for this config")
    return dataclasses.replace(config, expert_format=expert_format)


@functools.lru_cache(maxsize=None)
def _dense_hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor of a dense Hugging Face checkpoint for `config` (whatever its
    expert_format)."""
    abstract = _abstract_flat(dataclasses.replace(config, expert_format="dense"), jnp.float32)
    shapes = {}
    for name in hf_names(config):
        entry = hf_tensor(config, name)
        target = abstract[entry.path]
        one = target.shape[1:] if entry.layer_pair is not None else target.shape
        shapes[name] = tuple(jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(one, jnp.float32)).shape)
    return shapes


def _mxfp4_shapes(dense: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Blocks and scales shapes for a dense expert weight [E, in, out]."""
    experts, fan_in, fan_out = dense
    groups = fan_in // mxfp4.BLOCK_SIZE
    return (experts, fan_out, groups, mxfp4.BLOCK_BYTES), (experts, fan_out, groups)


def _hf_recipes(config: Config, quantized: bool) -> dict[str, _Recipe]:
    recipes = {}
    for name in hf_names(config):
        if quantized and name.endswith(MXFP4_HF_NAMES):
            recipes[name] = _Recipe(f"{name}_blocks", scales=f"{name}_scales")
        else:
            recipes[name] = _Recipe(name)
    return recipes


_OPENAI_PER_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "self_attn.sinks": "attn.sinks",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj": "mlp.mlp1_weight",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj": "mlp.mlp2_weight",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_OPENAI_GLOBAL = {"model.embed_tokens.weight": "embedding.weight", "model.norm.weight": "norm.scale",
                  "lm_head.weight": "unembedding.weight"}


def _openai_recipes(config: Config) -> dict[str, _Recipe]:
    """OpenAI `original/` names; q, k and v are row ranges of `attn.qkv` [(n + 2k) * h, ...]."""
    q, kv, d = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.hidden
    qkv_rows = {"q": 0, "k": q, "v": q + kv}
    recipes = {}
    for name in hf_names(config):
        if name in _OPENAI_GLOBAL:
            recipes[name] = _Recipe(_OPENAI_GLOBAL[name])
            continue
        layer, suffix = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
        block = f"block.{layer}"
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", suffix)
        if proj:
            shape = (q + 2 * kv, d) if proj[2] == "weight" else (q + 2 * kv,)
            recipes[name] = _Recipe(f"{block}.attn.qkv.{proj[2]}", row_offset=qkv_rows[proj[1]], stored_shape=shape)
        elif suffix.endswith(("gate_up_proj", "down_proj")):
            stored = f"{block}.{_OPENAI_PER_LAYER[suffix]}"
            recipes[name] = _Recipe(f"{stored}.blocks", scales=f"{stored}.scales")
        else:
            recipes[name] = _Recipe(f"{block}.{_OPENAI_PER_LAYER[suffix]}")
    return recipes


def _expected_stored(config: Config, recipes: dict[str, _Recipe]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{stored name: (shape, "float" | "uint8")} that `recipes` read for `config`."""
    expected = {}
    for name, shape in _dense_hf_shapes(config).items():
        recipe = recipes[name]
        if recipe.scales is not None:
            blocks, scales = _mxfp4_shapes(shape)
            expected[recipe.stored], expected[recipe.scales] = (blocks, "uint8"), (scales, "uint8")
        else:
            expected[recipe.stored] = (recipe.stored_shape or shape, "float")
    return expected


def config_from_openai_dict(raw: dict[str, Any], name: str = "gpt-oss", source: str = "<dict>") -> Config:
    """A Config from OpenAI's `original/config.json` (keys of gpt_oss.torch.model.ModelConfig)."""
    try:
        num_layers = int(raw["num_hidden_layers"])
        return Config(
            name=name, num_layers=num_layers, hidden=int(raw["hidden_size"]),
            num_heads=int(raw["num_attention_heads"]), num_kv_heads=int(raw["num_key_value_heads"]),
            head_dim=int(raw["head_dim"]), num_experts=int(raw["num_experts"]),
            experts_per_token=int(raw["experts_per_token"]), intermediate=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]), sliding_window=int(raw["sliding_window"]),
            layer_types=tuple((SLIDING, FULL)[i % 2] for i in range(num_layers)),
            rope_theta=float(raw.get("rope_theta", 150000.0)),
            rope_factor=float(raw.get("rope_scaling_factor", 32.0)),
            rope_beta_fast=float(raw.get("rope_ntk_beta", 32.0)),
            rope_beta_slow=float(raw.get("rope_ntk_alpha", 1.0)),
            rope_original_max_positions=int(raw.get("initial_context_length", 4096)),
            rope_truncate=False,
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        )
    except KeyError as missing:
        raise CheckpointError(f"{source}: OpenAI gpt-oss config is missing key {missing}") from None
    except (TypeError, ValueError) as bad:
        raise CheckpointError(f"{source}: {bad}") from None


@dataclasses.dataclass
class SourceCheckpoint:
    """A validated source checkpoint; `read` gives dense Hugging Face tensors whatever the layout."""

    directory: Path
    config: Config
    layout: str  # "huggingface" | "openai"
    quantized: bool  # experts stored as MXFP4
    tensors: dict[str, StoredTensor]
    recipes: dict[str, _Recipe]

    def read(self, hf_name: str, rows: slice | None = None, dtype: np.dtype | None = None) -> np.ndarray:
        """Rows `rows` of the dense Hugging Face tensor `hf_name` (all rows by default), as stored, or
        in `dtype` for MXFP4 weights (dequantized straight into it; float32 when None)."""
        recipe = self.recipes[hf_name]
        stored = self.tensors[recipe.stored]
        if recipe.scales is not None:
            values = mxfp4.dequantize(stored.read(rows), self.tensors[recipe.scales].read(rows),
                                      dtype if dtype in FLOAT_DTYPES else np.float32)  # [e, out, in]
            return swap_last_axes(values)
        if recipe.row_offset or recipe.stored_shape:
            dense_rows = _dense_row_count(self, hf_name)
            start, stop = (0, dense_rows) if rows is None else rows.indices(dense_rows)[:2]
            return stored.read(slice(recipe.row_offset + start, recipe.row_offset + stop))
        return stored.read(rows)

    def read_mxfp4(self, hf_name: str, part: str, rows: slice | None = None) -> np.ndarray:
        """Rows `rows` (experts) of expert weight `hf_name` [E, in, out] as MXFP4 in the released layout:
        `part` "blocks" uint8 [e, out, in/32, 16] or "scales" uint8 [e, out, in/32]. The stored bytes
        of an MXFP4 checkpoint (copied, never dequantized); `mxfp4.quantize` of the dense weights
        (transposed to [e, out, in]) otherwise."""
        recipe = self.recipes[hf_name]
        if recipe.scales is not None:
            return self.tensors[recipe.stored if part == "blocks" else recipe.scales].read(rows)
        blocks, scales = mxfp4.quantize(swap_last_axes(self.read(hf_name, rows)))
        return blocks if part == "blocks" else scales


def _dense_row_count(source: SourceCheckpoint, hf_name: str) -> int:
    return _dense_hf_shapes(source.config)[hf_name][0]


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs its config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return raw


def _has_safetensors(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file() or any(directory.glob("*.safetensors"))


def open_source(src: str | os.PathLike) -> SourceCheckpoint:
    """Finds, reads and validates a source checkpoint (headers only: no tensor data is read).

    Raises CheckpointError naming the file (and tensor) for: no checkpoint there, a config.json that is
    not gpt-oss, truncated or corrupt safetensors files, missing or unexpected tensors, and tensors whose
    shape or dtype does not match the config.
    """
    directory = _resolve_source_dir(src)
    if not _has_safetensors(directory) and (directory / "original").is_dir():
        directory = directory / "original"
    if not _has_safetensors(directory):
        raise CheckpointError(f"{directory}: no *.safetensors files (nor an original/ directory holding some)")
    config_path = directory / CONFIG_FILE
    raw = _read_json(config_path)
    name = (directory.parent if directory.name == "original" else directory).name
    tensors = scan_safetensors(directory)
    if "model_type" in raw or "num_experts" not in raw:
        try:
            config = from_hf_dict(raw, name=name, source=str(config_path))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        quantized = any(n.endswith("_blocks") for n in tensors)
        layout, recipes = "huggingface", _hf_recipes(config, quantized)
    else:
        config = config_from_openai_dict(raw, name=name, source=str(config_path))
        quantized, layout, recipes = True, "openai", _openai_recipes(config)
    config = dataclasses.replace(config, expert_format="dense")  # a source's config describes dense params
    _validate_tensors(directory, config, tensors, _expected_stored(config, recipes))
    return SourceCheckpoint(directory, config, layout, quantized, tensors, recipes)


def _validate_tensors(directory: Path, config: Config, tensors: dict[str, StoredTensor],
                      expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """CheckpointError for the first missing, unexpected, mis-shaped or mis-typed tensor."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}{more} (gpt-oss config {config.name!r}: "
                              f"{config.num_layers} layers, {config.num_experts} experts)")
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{tensor.file}: unexpected tensor {name!r}: not a weight of gpt-oss config "
                                  f"{config.name!r} ({config.num_layers} layers) in this layout")
        shape, kind = expected[name]
        if tensor.shape != shape:
            raise CheckpointError(f"{tensor.file}: tensor {name!r} has shape {list(tensor.shape)}, but config "
                                  f"{config.name!r} needs {list(shape)}")
        ok = tensor.dtype == np.uint8 if kind == "uint8" else tensor.dtype in (*FLOAT_DTYPES, np.float64)
        if not ok:
            wanted = "U8 (MXFP4 blocks/scales)" if kind == "uint8" else "a float dtype (F32, BF16, F16, F64)"
            raise CheckpointError(f"{tensor.file}: tensor {name!r} has dtype {tensor.dtype_code}, expected {wanted}")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _resolve_source_dir(src: str | os.PathLike) -> Path:
    """A local directory for `src`: the directory itself, or a Hub snapshot of the repo id `src`."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory holding config.json "
                              "and *.safetensors)")
    if not _HUB_ID.fullmatch(str(src)):
        raise CheckpointError(f"{src}: no such directory")
    return _download_from_hub(str(src))


def _download_from_hub(repo_id: str) -> Path:
    """Hugging Face files (config, safetensors, index) of Hub repo `repo_id`, via the local HF cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such directory; to download it from the Hugging Face Hub, "
                              "pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"],
                                      ignore_patterns=["original/*", "metal/*"]))
    except Exception as err:  # offline, unknown repo, gated, disk full: all say the same to the user
        raise CheckpointError(f"{repo_id}: no such directory, and downloading it from the Hugging Face Hub failed "
                              f"({type(err).__name__}: {err}). Offline? Download it elsewhere and pass the "
                              "directory.") from err


# ---------------------------------------------------------------------------------------------
# Param readers: any box of any param, from a source checkpoint or a converted one

class ParamReader(Protocol):
    config: Config

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        """param[path][box] (box: one slice with step 1 per axis) in the reader's dtype for `path`."""


def _normalize_box(index: Sequence[slice], shape: tuple[int, ...]) -> Box:
    return tuple(slice(*s.indices(dim)[:2]) for s, dim in zip(index, shape))


class SourceParams:
    """Params read from a `SourceCheckpoint`, box by box, converted to `dtype` (norm scales: float32).

    Stacked weights are read one layer pair at a time; expert matrices [pairs, E, in, out] only for the
    experts in the box; the embeddings only for the rows in the box. With `expert_format` "mxfp4", the
    experts are the uint8 MXFP4 params (`SourceCheckpoint.read_mxfp4`, relaid out), read likewise.
    """

    def __init__(self, source: SourceCheckpoint, dtype: Any, expert_format: str = "dense"):
        self.source = source
        self.config = _with_expert_format(source.config, expert_format, source.directory)
        self.abstract = _abstract_flat(self.config, np.dtype(dtype))
        self.names: dict[ParamPath, dict[int | None, str]] = collections.defaultdict(dict)
        for name in hf_names(self.config):
            entry = hf_tensor(self.config, name)
            self.names[entry.path][entry.layer_pair] = name

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        dtype = self.abstract[path].dtype
        mxfp4_leaf = _mxfp4_leaf(path)
        names = self.names[path if mxfp4_leaf is None else mxfp4_leaf[0]]
        if mxfp4_leaf is not None:  # [pairs, E, out, 16, in/32] or [pairs, E, out, in/32]
            part = mxfp4_leaf[1]
            value = _stack([_released_box(self.source.read_mxfp4(names[p], part, rows=box[1]), part, box[2:])
                            for p in range(box[0].start, box[0].stop)])
        elif None in names:  # embed, unembed, final norm: HF layout == param layout
            value = self.source.read(names[None], rows=box[0], dtype=dtype)[(slice(None), *box[1:])]
        elif path[-1] in EXPERT_WEIGHTS:  # [pairs, E, in, out]; HF [E, in, out] per layer
            value = _stack([self.source.read(names[p], rows=box[1], dtype=dtype)[(slice(None), *box[2:])]
                            for p in range(box[0].start, box[0].stop)])
        else:
            value = _stack([hf_tensor(self.config, names[p]).to_param(self.source.read(names[p]))[box[1:]]
                            for p in range(box[0].start, box[0].stop)])
        return value.astype(dtype, copy=False)


def _released_box(released: np.ndarray, part: str, box: Box) -> np.ndarray:
    """MXFP4 `part` of some experts in the released layout (blocks [e, out, G, 16], scales [e, out, G])
    -> `box` of its in-memory layout (blocks [e, out, 16, G], scales as released), all experts."""
    if part == "blocks":
        return mxfp4.from_released_layout(released[:, box[0], box[2], box[1]])
    return released[(slice(None), *box)]


def _stack(pieces: list[np.ndarray]) -> np.ndarray:
    """np.stack, without a copy for a single piece (the common case: one layer pair per chunk)."""
    return pieces[0][None] if len(pieces) == 1 else np.stack(pieces)


class OrbaxParams:
    """Params read box by box from a converted checkpoint's Orbax directory, through tensorstore."""

    def __init__(self, checkpoint: Path, config: Config):
        self.config, self.directory = config, checkpoint / PARAMS_DIR
        metadata = _read_json(self.directory / "_METADATA")
        self.use_ocdbt = bool(metadata.get("use_ocdbt", ocp.type_handlers.is_ocdbt_checkpoint(self.directory)))
        self.use_zarr3 = bool(metadata.get("use_zarr3", False))
        self.stores: dict[ParamPath, ts.TensorStore] = {}
        self.context = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)

    def store(self, path: ParamPath) -> ts.TensorStore:
        if path not in self.stores:
            info = ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=self.directory,
                                               is_ocdbt_checkpoint=self.use_ocdbt, use_zarr3=self.use_zarr3,
                                               ts_context=self.context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
            try:
                self.stores[path] = ts.open(spec, open=True, read=True, context=self.context).result()
            except Exception as err:
                raise CheckpointError(f"{self.directory}: cannot open param {'/'.join(path)} (missing or "
                                      f"corrupt; config.json says expert_format "
                                      f"{self.config.expert_format!r}): {_describe(err)[:300]}") from err
        return self.stores[path]

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        store = self.store(path)
        try:
            return store[box].read().result()
        except Exception as err:
            raise CheckpointError(f"{self.directory}: reading param {'/'.join(path)} {list(store.shape)} "
                                  f"failed: {_describe(err)[:300]}") from err

    def check_shape(self, path: ParamPath, shape: tuple[int, ...]) -> None:
        """CheckpointError unless the stored param `path` has `shape` (what config.json implies)."""
        stored = tuple(self.store(path).shape)
        if stored != tuple(shape):
            raise CheckpointError(f"{self.directory}: param {'/'.join(path)} is stored with shape {list(stored)}, "
                                  f"but config.json implies {list(shape)}")


class ExpertFormatView:
    """The params of `base` with the experts in `expert_format`, one box of experts at a time: MXFP4
    experts dequantized (`mxfp4.dequantize`, into `dtype`) to dense [pairs, E, in, out], or dense ones
    quantized (`mxfp4.quantize`) to the MXFP4 params; every other param read from `base` as it is."""

    def __init__(self, base: ParamReader, expert_format: str, dtype: Any = np.float32):
        self.base, self.dtype = base, np.dtype(dtype)
        self.config = _with_expert_format(base.config, expert_format, getattr(base, "directory", "checkpoint"))
        self.base_shapes = {path: tuple(a.shape) for path, a in _abstract_flat(base.config, np.float32).items()}

    def _whole(self, path: ParamPath, box: Box) -> Box:
        """`box`'s layer pairs and experts, every index of the other axes of `base`'s param `path`."""
        return (box[0], box[1], *(slice(0, d) for d in self.base_shapes[path][2:]))

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        if self.config.expert_format == self.base.config.expert_format:
            return self.base.read_box(path, box)
        mxfp4_leaf = _mxfp4_leaf(path)
        if mxfp4_leaf is not None:  # dense base -> MXFP4
            dense_path, part = mxfp4_leaf
            dense = self.base.read_box(dense_path, self._whole(dense_path, box))  # [p, e, in, out]
            blocks, scales = mxfp4.quantize(swap_last_axes(dense))  # [p, e, out, G, 16], [p, e, out, G]
            return _stack([_released_box(x, part, box[2:]) for x in (blocks if part == "blocks" else scales)])
        if path[0] == "layers" and path[-1] in EXPERT_WEIGHTS:  # MXFP4 base -> dense
            blocks_path, scales_path = _mxfp4_path(path, "blocks"), _mxfp4_path(path, "scales")
            blocks = mxfp4.to_released_layout(self.base.read_box(blocks_path, self._whole(blocks_path, box)))
            scales = self.base.read_box(scales_path, self._whole(scales_path, box))
            values = mxfp4.dequantize(blocks, scales, self.dtype)  # [p, e, out, in]
            return swap_last_axes(values[..., box[3], box[2]])
        return self.base.read_box(path, box)


def _converted_dtype(checkpoint: Path) -> np.dtype:
    return np.dtype(_read_json(checkpoint / CONFIG_FILE).get("dtype", "bfloat16"))


def _is_converted(path: Path) -> bool:
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def open_params(path: str | os.PathLike, dtype: Any = None, expert_format: str | None = None) -> ParamReader:
    """A reader for a converted checkpoint (dtype as stored) or any source `convert_checkpoint` takes
    (dtype `dtype`, default float32). Experts as stored (sources: dense) unless `expert_format` says
    otherwise (then converted through `ExpertFormatView`, or copied from an MXFP4 source's bytes)."""
    path = Path(path)
    if _is_converted(path):
        reader = OrbaxParams(path, load_config(path))
        if expert_format in (None, reader.config.expert_format):
            return reader
        return ExpertFormatView(reader, expert_format, _converted_dtype(path) if dtype is None else dtype)
    return SourceParams(open_source(path), np.float32 if dtype is None else dtype, expert_format or "dense")


# ---------------------------------------------------------------------------------------------
# Atomic directories

@contextlib.contextmanager
def _atomic_directory(dst: Path, force: bool) -> Iterator[Path]:
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


def _check_destination(src: Path | None, dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (--force) to replace it")
    if src is not None and src.exists():
        src, resolved = src.resolve(), dst.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise CheckpointError(f"{dst}: the destination must not contain or be inside the source {src}")


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _check_float_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


# ---------------------------------------------------------------------------------------------
# convert_checkpoint: streaming into an Orbax checkpoint

@dataclasses.dataclass
class _StreamedLeaf:
    """A param Orbax saves by pulling its chunks from `reader` (see `_StreamedLeafHandler`)."""

    path: ParamPath
    shape: tuple[int, ...]
    dtype: np.dtype
    reader: ParamReader
    on_written: Callable[[int], None]

    @property
    def per_piece_axes(self) -> tuple[int, ...]:
        """Axes stored one index per chunk: the layer-pair axis, and the expert axis of expert matrices."""
        if self.path[0] != "layers":
            return ()
        return (0, 1) if self.path[-1] in EXPERT_WEIGHTS or _mxfp4_leaf(self.path) else (0,)


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
    abstract = _abstract_flat(reader.config, dtype)
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
    return {**config.to_hf_dict(), "dtype": _dtype_name(dtype), **extra}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = jnp.bfloat16,
                       force: bool = False, progress: bool = True, *, keep_mxfp4: bool = False) -> Path:
    """Converts a Hugging Face / OpenAI gpt-oss checkpoint (directory or Hub id) to DST (see module doc).

    Streaming (peak memory a few chunks of <= 128 MiB), with a tqdm bar in bytes. Atomic: written to a
    temporary directory beside DST and renamed when complete; a failed conversion leaves no DST, and an
    existing DST is replaced only with `force` and only by a complete checkpoint. Weights are stored in
    `dtype` (float32, bfloat16 or float16), norm scales in float32. Returns DST.

    `keep_mxfp4` (`--keep-mxfp4`): the experts stay MXFP4, as the uint8 params `*_blocks` / `*_scales`
    (config.json says `"expert_format": "mxfp4"`; `load_model` gives a model that runs on them). From
    an MXFP4 source their bytes are copied (relaid out, never dequantized); from a dense source the
    weights are quantized with `mxfp4.quantize` (lossy: values rounded to e2m1 with a shared power-of-
    two scale per 32). Needs hidden and intermediate sizes that are multiples of 32.

    Raises CheckpointError (a ValueError naming the file and tensor) for a bad source or a failed write
    (e.g. a full disk), FileExistsError when DST exists and not `force`.
    """
    dtype = _check_float_dtype(dtype)
    dst = Path(dst).expanduser().absolute()
    _check_destination(Path(src).expanduser(), dst, force)
    source = open_source(src)
    reader = SourceParams(source, dtype, "mxfp4" if keep_mxfp4 else "dense")
    with _atomic_directory(dst, force) as tmp:
        try:
            _save_streamed(tmp / PARAMS_DIR, reader, dtype, progress, desc=f"convert {source.directory.name}")
            _write_json(tmp / CONFIG_FILE, converted_config_dict(reader.config, dtype))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{dst}: writing the converted checkpoint failed ({_describe(err)}); "
                                  "nothing was written there") from err
    return dst


def _describe(err: BaseException) -> str:
    """The error for a message; a full disk (OSError ENOSPC anywhere in the chain) said plainly."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return f"no space left on device: {cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------
# load_model

def load_model(dst: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, *,
               shardings: Params | None = None, keep_mxfp4: bool | None = None) -> tuple[Config, Params]:
    """(config, params) from a converted checkpoint, restored straight into their shardings.

    `dst` is a converted checkpoint (Orbax restore into `jax.ShapeDtypeStruct` targets; `dtype` None
    keeps the stored dtype, else weights are cast on restore), or any source `convert_checkpoint`
    takes, loaded directly without a temporary copy: each device's shard is read from the safetensors
    files (MXFP4 dequantized) by `jax.make_array_from_callback`; `dtype` None means bfloat16 then.
    Norm scales are always float32.

    Experts: `keep_mxfp4` None keeps them as the checkpoint holds them (a converted checkpoint: dense
    or MXFP4 as its config.json says; a source: dense). True gives MXFP4 params (`config.expert_format`
    "mxfp4"; uint8 `*_blocks` / `*_scales`, never cast to `dtype`): an MXFP4 source's bytes copied as
    `convert_checkpoint(keep_mxfp4=True)` would store them, dense weights quantized. False gives dense
    experts in `dtype`, MXFP4 ones dequantized on load.

    Shardings: `shardings` (a pytree of `jax.sharding.Sharding` shaped like the params) when given;
    else `gptoss_jax.sharding.param_shardings(config, mesh)` with a `mesh`; else all on one device.
    """
    path = Path(dst).expanduser()
    converted = _is_converted(path)
    if converted:
        stored_config = load_config(path)
        dtype = _check_float_dtype(_converted_dtype(path) if dtype is None else dtype)
    else:
        source = open_source(path)
        stored_config, dtype = source.config, _check_float_dtype(jnp.bfloat16 if dtype is None else dtype)
    expert_format = stored_config.expert_format if keep_mxfp4 is None else ("mxfp4" if keep_mxfp4 else "dense")
    config = _with_expert_format(stored_config, expert_format, path)
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
    """Each param as a jax.Array with its sharding, every shard read from `reader` directly, in
    slices of <= CHUNK_BYTES written into the shard's buffer in place (`_read_shard`): peak memory is
    the params plus a few slices, whatever the size of one weight."""
    flat_shardings = flatten(shardings)

    def load(path: ParamPath, target: jax.ShapeDtypeStruct) -> jax.Array:
        shape, sharding = tuple(target.shape), flat_shardings[path]
        if isinstance(reader, OrbaxParams):
            reader.check_shape(path, shape)
        shards = [_read_shard(reader, path, _normalize_box(index, shape), target.dtype, device)
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


# ---------------------------------------------------------------------------------------------
# export_checkpoint: Hugging Face safetensors, streaming

@dataclasses.dataclass
class OutTensor:
    """One tensor of an exported file: its header entry and a generator of its bytes, in order."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _export_plan(reader: ParamReader, dtype: np.dtype, quantize: bool) -> list[OutTensor]:
    """Every tensor of the exported checkpoint, in Hugging Face order (MXFP4: blocks, then scales).
    `reader`'s experts must be dense unless `quantize` (MXFP4 ones are then written as they are)."""
    config = reader.config
    plan = []
    for name, shape in _dense_hf_shapes(config).items():
        entry = hf_tensor(config, name)
        if quantize and name.endswith(MXFP4_HF_NAMES) and config.expert_format == "mxfp4":
            plan.extend(_mxfp4_copied_tensors(reader, name, entry.path, entry.layer_pair, shape))
        elif quantize and name.endswith(MXFP4_HF_NAMES):
            plan.extend(_mxfp4_out_tensors(reader, name, entry.path, entry.layer_pair, shape))
        elif entry.layer_pair is None:
            plan.append(OutTensor(name, dtype, shape, functools.partial(_global_chunks, reader, entry.path,
                                                                          shape, dtype)))
        elif entry.path[-1] in EXPERT_WEIGHTS:
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
        box = (slice(start, min(start + rows, shape[0])), *(slice(0, d) for d in shape[1:]))
        yield reader.read_box(path, box).astype(dtype)


def _pair_box(pair: int, shape: tuple[int, ...]) -> Box:
    return (slice(pair, pair + 1), *(slice(0, d) for d in shape))


def _expert_matrix(reader: ParamReader, path: ParamPath, pair: int, expert: int, shape: tuple[int, ...]
                   ) -> np.ndarray:
    """One expert's matrix [in, out] (`shape` is the HF tensor's [E, in, out])."""
    box = (slice(pair, pair + 1), slice(expert, expert + 1), slice(0, shape[1]), slice(0, shape[2]))
    return reader.read_box(path, box)[0, 0]


def _expert_chunks(reader: ParamReader, path: ParamPath, pair: int, shape: tuple[int, ...], dtype: np.dtype
                   ) -> Iterator[np.ndarray]:
    for expert in range(shape[0]):
        yield _expert_matrix(reader, path, pair, expert, shape).astype(dtype)


def _layer_chunks(reader: ParamReader, name: str, pair: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    entry = hf_tensor(reader.config, name)
    leaf_shape = _abstract_flat(reader.config, jnp.float32)[entry.path].shape[1:]
    yield np.ascontiguousarray(entry.to_hf(reader.read_box(entry.path, _pair_box(pair, leaf_shape))[0])).astype(dtype)


def _mxfp4_out_tensors(reader: ParamReader, name: str, path: ParamPath, pair: int, shape: tuple[int, ...]
                       ) -> list[OutTensor]:
    """`NAME_blocks` and `NAME_scales` of one layer's expert weight, quantized one expert at a time;
    the blocks pass stashes the scales, which are written right after."""
    blocks_shape, scales_shape = _mxfp4_shapes(shape)
    stash: list[np.ndarray] = []

    def blocks() -> Iterator[np.ndarray]:
        stash.clear()
        for expert in range(shape[0]):
            matrix = _expert_matrix(reader, path, pair, expert, shape)  # [in, out]
            expert_blocks, expert_scales = mxfp4.quantize(swap_last_axes(matrix))  # [out, in/32, 16], [out, in/32]
            stash.append(expert_scales)
            yield expert_blocks

    def scales() -> Iterator[np.ndarray]:
        assert len(stash) == shape[0], "scales are written right after their blocks"
        yield np.stack(stash)

    u8 = np.dtype(np.uint8)
    return [OutTensor(f"{name}_blocks", u8, blocks_shape, blocks),
            OutTensor(f"{name}_scales", u8, scales_shape, scales)]


def _mxfp4_copied_tensors(reader: ParamReader, name: str, path: ParamPath, pair: int, shape: tuple[int, ...]
                          ) -> list[OutTensor]:
    """`NAME_blocks` and `NAME_scales` of one layer's MXFP4 expert weight, one expert at a time, the
    params' bytes as they are (blocks back in the released layout)."""
    blocks_shape, scales_shape = _mxfp4_shapes(shape)

    def chunks(part: str) -> Iterator[np.ndarray]:
        part_path = _mxfp4_path(path, part)
        leaf_shape = _abstract_flat(reader.config, np.float32)[part_path].shape[1:]
        for expert in range(shape[0]):
            box = (slice(pair, pair + 1), slice(expert, expert + 1), *(slice(0, d) for d in leaf_shape[1:]))
            value = reader.read_box(part_path, box)[0, 0]
            yield mxfp4.to_released_layout(value) if part == "blocks" else value

    u8 = np.dtype(np.uint8)
    return [OutTensor(f"{name}_blocks", u8, blocks_shape, functools.partial(chunks, "blocks")),
            OutTensor(f"{name}_scales", u8, scales_shape, functools.partial(chunks, "scales"))]


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


def _safetensors_header(tensors: list[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": _SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape),
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
        f.write(_safetensors_header(tensors))
        for tensor in tensors:
            written = 0
            for chunk in tensor.chunks():
                chunk = np.ascontiguousarray(chunk, dtype=tensor.dtype)
                f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
                on_written(chunk.nbytes)
            if written != tensor.nbytes:
                raise AssertionError(f"{tensor.name}: wrote {written} bytes, expected {tensor.nbytes}")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes in-memory arrays (any numpy dtype safetensors has, bfloat16 included) to one file."""
    out = [OutTensor(name, np.dtype(a.dtype), tuple(a.shape), functools.partial(iter, [a]))
           for name, a in ((n, np.asarray(v)) for n, v in tensors.items())]
    write_safetensors(Path(path), out)


def load_safetensors(directory_or_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, or of a checkpoint directory (index or *.safetensors), in
    memory (small checkpoints, tests); bfloat16 as ml_dtypes.bfloat16."""
    path = Path(directory_or_file)
    stored = scan_safetensors(path) if path.is_dir() else read_safetensors_header(path)
    return {name: tensor.read() for name, tensor in stored.items()}


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
        _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def stored_tensor_specs(config: Config, quantized: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, "float" | "uint8")} of a Hugging Face checkpoint for `config`, in file order
    (MXFP4 experts as `*_blocks` / `*_scales` when `quantized`, as released)."""
    return _expected_stored(config, _hf_recipes(config, quantized))


def exported_config_dict(config: Config, dtype: Any, quantized: bool) -> dict[str, Any]:
    """config.json of an exported Hugging Face checkpoint (with quantization_config when MXFP4)."""
    hf = {**config.to_hf_dict(), "dtype": _dtype_name(dtype)}
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
    quantization_config in config.json): MXFP4 experts (a `--keep-mxfp4` checkpoint, an MXFP4 source)
    written byte for byte as they are, dense ones quantized. Without `mxfp4`, MXFP4 experts are
    dequantized to dense. Streaming (one expert / layer / row chunk at a time) and atomic like
    `convert_checkpoint`. Returns OUT.
    """
    dtype = _check_float_dtype(dtype)
    out = Path(out).expanduser().absolute()
    _check_destination(Path(dst).expanduser(), out, force)
    reader = open_params(dst)
    if mxfp4 and isinstance(reader, SourceParams) and reader.source.quantized:
        reader = SourceParams(reader.source, np.float32, "mxfp4")  # copy the source's bytes
    elif not mxfp4 and reader.config.expert_format == "mxfp4":
        reader = ExpertFormatView(reader, "dense", dtype)
    plan = _export_plan(reader, dtype, mxfp4)
    total = sum(t.nbytes for t in plan)
    with _atomic_directory(out, force) as tmp, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                      desc=f"export {out.name}", disable=not progress) as bar:
        try:
            write_sharded_safetensors(tmp, plan, max_shard_bytes, bar.update)
            _write_json(tmp / CONFIG_FILE, exported_config_dict(reader.config, dtype, mxfp4))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{out}: exporting failed ({_describe(err)}); nothing was written there") from err
    return out
