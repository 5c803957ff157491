"""Param readers: any box of any param leaf, from a source checkpoint or a converted one, in any expert format.

A `ParamReader` gives `read_box(path, box)`: param leaf `path` (a quantized weight's parts are leaves
`.../gate_up/blocks`, `.../gate_up/scales`) restricted to `box`, as numpy. Conversion, loading and
export all read through one; `open_params` picks it.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.files import CONFIG_FILE, PARAMS_DIR, CheckpointError, describe, read_json
from gptoss_jax.checkpoint.layout import (Box, ParamPath, abstract_flat, is_expert_matrix, part_paths,
                                          quantized_part, swap_last_axes, whole, with_expert_format)
from gptoss_jax.checkpoint.sources import SourceCheckpoint, open_source
from gptoss_jax.config import Config, load_config
from gptoss_jax.params import hf_names, hf_tensor


class ParamReader(Protocol):
    config: Config

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        """param[path][box] (box: one slice with step 1 per axis) in the reader's dtype for `path`."""


class SourceParams:
    """Params read from a `SourceCheckpoint`, box by box, converted to `dtype` (norm scales: float32).

    Stacked weights are read one layer pair at a time; expert matrices [pairs, E, in, out] only for the
    experts in the box; the embeddings only for the rows in the box. With `expert_format` "mxfp4", each
    expert matrix is an MXFP4Weight whose parts (`blocks`, `scales`) are read likewise from the source's
    MXFP4 bytes (`SourceCheckpoint.read_mxfp4`, relaid out).
    """

    def __init__(self, source: SourceCheckpoint, dtype: Any, expert_format: str = "dense"):
        self.source = source
        self.config = with_expert_format(source.config, expert_format, source.directory)
        self.abstract = abstract_flat(self.config, np.dtype(dtype))
        self.names: dict[ParamPath, dict[int | None, str]] = collections.defaultdict(dict)
        for name in hf_names(self.config):
            entry = hf_tensor(self.config, name)
            self.names[entry.path][entry.layer_pair] = name

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        dtype = self.abstract[path].dtype
        part = quantized_part(self.config, path)
        names = self.names[path if part is None else part[0]]
        pairs = range(box[0].start, box[0].stop)
        if part is not None:  # [pairs, E, out, 16, in/32] or [pairs, E, out, in/32]
            value = _stack([_released_box(self.source.read_mxfp4(names[p], part[1], rows=box[1]), part[1], box[2:])
                            for p in pairs])
        elif None in names:  # embed, unembed, final norm: HF layout == param layout
            value = self.source.read(names[None], rows=box[0], dtype=dtype)[(slice(None), *box[1:])]
        elif is_expert_matrix(path):  # [pairs, E, in, out]; HF [E, in, out] per layer
            value = _stack([self.source.read(names[p], rows=box[1], dtype=dtype)[(slice(None), *box[2:])]
                            for p in pairs])
        else:
            value = _stack([hf_tensor(self.config, names[p]).to_param(self.source.read(names[p]))[box[1:]]
                            for p in pairs])
        return value.astype(dtype, copy=False)


def _released_box(released: np.ndarray, part: str, box: Box) -> np.ndarray:
    """MXFP4 `part` of some experts in the released layout (blocks [e, out, G, 16], scales [e, out, G])
    -> `box` of the MXFP4Weight's part (blocks [e, out, 16, G], scales as released), all experts."""
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
        metadata = read_json(self.directory / "_METADATA")
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
                                      f"{self.config.expert_format!r}): {describe(err)[:300]}") from err
        return self.stores[path]

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        store = self.store(path)
        try:
            return store[box].read().result()
        except Exception as err:
            raise CheckpointError(f"{self.directory}: reading param {'/'.join(path)} {list(store.shape)} "
                                  f"failed: {describe(err)[:300]}") from err

    def check_shape(self, path: ParamPath, shape: tuple[int, ...]) -> None:
        """CheckpointError unless the stored param `path` has `shape` (what config.json implies)."""
        stored = tuple(self.store(path).shape)
        if stored != tuple(shape):
            raise CheckpointError(f"{self.directory}: param {'/'.join(path)} is stored with shape {list(stored)}, "
                                  f"but config.json implies {list(shape)}")


class ExpertFormatView:
    """The params of `base` with the experts in `expert_format`, one box of experts at a time: MXFP4
    experts dequantized (`mxfp4.dequantize`, into `dtype`) to dense [pairs, E, in, out], or dense ones
    quantized (`mxfp4.quantize`) to MXFP4Weight parts; every other param read from `base` as it is."""

    def __init__(self, base: ParamReader, expert_format: str, dtype: Any = np.float32):
        self.base, self.dtype = base, np.dtype(dtype)
        self.config = with_expert_format(base.config, expert_format, getattr(base, "directory", "checkpoint"))
        self.base_shapes = {path: tuple(a.shape) for path, a in abstract_flat(base.config, np.float32).items()}

    def _whole(self, path: ParamPath, box: Box) -> Box:
        """`box`'s layer pairs and experts, every index of the other axes of `base`'s param `path`."""
        return (box[0], box[1], *whole(self.base_shapes[path][2:]))

    def read_box(self, path: ParamPath, box: Box) -> np.ndarray:
        if self.config.expert_format == self.base.config.expert_format:
            return self.base.read_box(path, box)
        part = quantized_part(self.config, path)
        if part is not None:  # dense base -> MXFP4
            dense_path, name = part
            dense = self.base.read_box(dense_path, self._whole(dense_path, box))  # [p, e, in, out]
            blocks, scales = mxfp4.quantize(swap_last_axes(dense))  # [p, e, out, G, 16], [p, e, out, G]
            return _stack([_released_box(x, name, box[2:]) for x in (blocks if name == "blocks" else scales)])
        if is_expert_matrix(path):  # MXFP4 base -> dense
            parts = part_paths(self.base.config, path)
            blocks = mxfp4.to_released_layout(self.base.read_box(parts["blocks"], self._whole(parts["blocks"], box)))
            scales = self.base.read_box(parts["scales"], self._whole(parts["scales"], box))
            values = mxfp4.dequantize(blocks, scales, self.dtype)  # [p, e, out, in]
            return swap_last_axes(values[..., box[3], box[2]])
        return self.base.read_box(path, box)


def converted_dtype(checkpoint: Path) -> np.dtype:
    """The dtype a converted checkpoint's weights are stored in (its config.json's "dtype")."""
    return np.dtype(read_json(checkpoint / CONFIG_FILE).get("dtype", "bfloat16"))


def is_converted(path: Path) -> bool:
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def open_params(path: str | os.PathLike, dtype: Any = None, expert_format: str | None = None) -> ParamReader:
    """A reader for a converted checkpoint (dtype as stored) or any source `convert_checkpoint` takes
    (dtype `dtype`, default float32). Experts as stored (sources: dense) unless `expert_format` says
    otherwise (then converted through `ExpertFormatView`, or copied from an MXFP4 source's bytes)."""
    path = Path(path)
    if is_converted(path):
        reader = OrbaxParams(path, load_config(path))
        if expert_format in (None, reader.config.expert_format):
            return reader
        return ExpertFormatView(reader, expert_format, converted_dtype(path) if dtype is None else dtype)
    return SourceParams(open_source(path), np.float32 if dtype is None else dtype, expert_format or "dense")
