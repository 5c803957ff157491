"""Checkpoints: convert Hugging Face / OpenAI files to Orbax (streaming, atomic), load them sharded, export.

A converted checkpoint DST is a directory holding
- `DST/config.json`: the model's Hugging Face config (`Config.to_hf_dict()`) plus `"dtype"`, the
  dtype the weights were stored in (norm scales are always float32), and `"expert_format": "mxfp4"`
  for a checkpoint converted with `keep_mxfp4` (`--keep-mxfp4`);
- `DST/params/`: an ordinary Orbax PyTree checkpoint (OCDBT + zarr, zstd) of the params pytree, paths
  as in `params.py`. Restore it with `ocp.StandardCheckpointer().restore(DST / "params", target)`
  where `target` holds `jax.ShapeDtypeStruct`s with shardings (`load_model` does exactly that).
  With `keep_mxfp4`, each layer's expert matrices `gate_up` / `down` are `quant.MXFP4Weight`s, stored
  as their uint8 parts `.../mlp/gate_up/blocks`, `.../mlp/gate_up/scales` (etc.): the model's
  in-memory MXFP4 layout (see `gptoss_jax.ops.mxfp4`: the released bytes with a block's 16 bytes
  moved before the block index), where a dense checkpoint has the float matrices `.../mlp/gate_up`.

Sources (`convert_checkpoint(SRC, ...)`, also accepted by `load_model` and `export_checkpoint`):
- a Hugging Face directory: `config.json` + `model.safetensors`, or shards listed in
  `model.safetensors.index.json`; experts dense (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]) or
  MXFP4 (`*_blocks` uint8 [E, out, in/32, 16] + `*_scales` uint8 [E, out, in/32]);
- an OpenAI `original/` directory (`embedding.weight`, `block.N.attn.qkv.weight`, MXFP4
  `block.N.mlp.mlp1_weight.blocks` ...), with OpenAI's `config.json`. A directory holding both
  Hugging Face files and `original/` is read from the Hugging Face files;
- a Hub id (`openai/gpt-oss-20b`) when no such local directory exists: downloaded with
  `huggingface_hub.snapshot_download` (Hugging Face files only).

Memory: conversion writes one zarr chunk at a time (one layer's slice, or one expert's matrix, or
<= 128 MiB of rows of the embeddings), reading only the rows it needs from the safetensors files,
with at most two chunk writes in flight: peak host memory is a few chunks, never the model.

Modules, bottom up (each imports only those above it):
    files           file names, CheckpointError, JSON, atomic directories
    safetensors_io  safetensors reading (the library) and the streaming writer
    layout          shapes for a config: params (typed quantized weights), dense HF tensors
    sources         HF / OpenAI layouts: open_source, SourceCheckpoint, validation, Hub download
    readers         ParamReader: SourceParams, OrbaxParams, ExpertFormatView, open_params
    convert         convert_checkpoint (Orbax, streamed)
    load            load_model
    export          export_checkpoint (safetensors, streamed)
"""

from gptoss_jax.checkpoint.convert import convert_checkpoint, converted_config_dict
from gptoss_jax.checkpoint.export import (DEFAULT_MAX_SHARD_BYTES, MXFP4_QUANTIZATION_CONFIG, export_checkpoint,
                                          exported_config_dict)
from gptoss_jax.checkpoint.files import CHUNK_BYTES, CONFIG_FILE, FLOAT_DTYPES, INDEX_FILE, PARAMS_DIR, CheckpointError
from gptoss_jax.checkpoint.layout import swap_last_axes
from gptoss_jax.checkpoint.load import load_model
from gptoss_jax.checkpoint.readers import ExpertFormatView, OrbaxParams, ParamReader, SourceParams, open_params
from gptoss_jax.checkpoint.safetensors_io import (OutTensor, StoredTensor, load_safetensors, read_safetensors_header,
                                                  save_safetensors, scan_safetensors, write_safetensors,
                                                  write_sharded_safetensors)
from gptoss_jax.checkpoint.sources import SourceCheckpoint, config_from_openai_dict, open_source, stored_tensor_specs

__all__ = [
    "CHUNK_BYTES", "CONFIG_FILE", "DEFAULT_MAX_SHARD_BYTES", "FLOAT_DTYPES", "INDEX_FILE", "MXFP4_QUANTIZATION_CONFIG",
    "PARAMS_DIR", "CheckpointError", "ExpertFormatView", "OrbaxParams", "OutTensor", "ParamReader", "SourceCheckpoint",
    "SourceParams", "StoredTensor", "config_from_openai_dict", "convert_checkpoint", "converted_config_dict",
    "export_checkpoint", "exported_config_dict", "load_model", "load_safetensors", "open_params", "open_source",
    "read_safetensors_header", "save_safetensors", "scan_safetensors", "stored_tensor_specs", "swap_last_axes",
    "write_safetensors", "write_sharded_safetensors",
]
