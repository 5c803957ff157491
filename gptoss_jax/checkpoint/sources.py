"""Source checkpoints: Hugging Face and OpenAI `original/` layouts, found, validated and read as dense HF tensors.

Every source is read through one view, `SourceCheckpoint.read(hf_name, rows)`: the tensor that a
dense Hugging Face checkpoint would hold under `hf_name`, rows `rows` of its first axis only (and,
for MXFP4 experts, `SourceCheckpoint.read_mxfp4`: the stored bytes, or the dense weights quantized).
Tensor names here are the files' names (`*_blocks` / `*_scales`, `block.N.mlp.mlp1_weight.blocks`);
the map from dense HF names to param paths is `params.hf_tensor`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.files import CONFIG_FILE, FLOAT_DTYPES, INDEX_FILE, CheckpointError, read_json
from gptoss_jax.checkpoint.layout import dense_hf_shapes, is_expert_matrix, released_mxfp4_shapes, swap_last_axes
from gptoss_jax.checkpoint.safetensors_io import FLOAT_CODES, StoredTensor, scan_safetensors
from gptoss_jax.config import FULL, SLIDING, Config, from_hf_dict
from gptoss_jax.params import hf_names, hf_tensor

Expected = dict[str, tuple[tuple[int, ...], str]]
"""{stored tensor name: (shape, "float" | "uint8")}."""


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


def _hf_recipes(config: Config, quantized: bool) -> dict[str, _Recipe]:
    """Hugging Face names; with `quantized`, each expert matrix NAME stored as NAME_blocks + NAME_scales."""
    recipes = {}
    for name in hf_names(config):
        if quantized and is_expert_matrix(hf_tensor(config, name).path):
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
    """OpenAI `original/` names; q, k and v are row ranges of `attn.qkv` [(n + 2k) * h, ...]; the
    expert matrices are always MXFP4 (`.blocks` + `.scales`)."""
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
        elif is_expert_matrix(hf_tensor(config, name).path):
            stored = f"{block}.{_OPENAI_PER_LAYER[suffix]}"
            recipes[name] = _Recipe(f"{stored}.blocks", scales=f"{stored}.scales")
        else:
            recipes[name] = _Recipe(f"{block}.{_OPENAI_PER_LAYER[suffix]}")
    return recipes


def _expected_stored(config: Config, recipes: dict[str, _Recipe]) -> Expected:
    """{stored name: (shape, "float" | "uint8")} that `recipes` read for `config`."""
    expected = {}
    for name, shape in dense_hf_shapes(config).items():
        recipe = recipes[name]
        if recipe.scales is not None:
            blocks, scales = released_mxfp4_shapes(shape)
            expected[recipe.stored], expected[recipe.scales] = (blocks, "uint8"), (scales, "uint8")
        else:
            expected[recipe.stored] = (recipe.stored_shape or shape, "float")
    return expected


def stored_tensor_specs(config: Config, quantized: bool) -> Expected:
    """{name: (shape, "float" | "uint8")} of a Hugging Face checkpoint for `config`, in file order
    (MXFP4 experts as `*_blocks` / `*_scales` when `quantized`, as released)."""
    return _expected_stored(config, _hf_recipes(config, quantized))


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
            dense_rows = dense_hf_shapes(self.config)[hf_name][0]
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
    raw = read_json(config_path)
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


def _validate_tensors(directory: Path, config: Config, tensors: dict[str, StoredTensor], expected: Expected) -> None:
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
        if tensor.dtype_code not in (("U8",) if kind == "uint8" else FLOAT_CODES):
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
