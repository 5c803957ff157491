"""The model's weights as plain pytrees, and the one map between Hugging Face names and param paths.

Shapes, dtypes and logical axes all come from the declarations in `model.py`:
- `abstract_params(config, dtype)`: a pytree of `jax.ShapeDtypeStruct` (no memory),
- `logical_axes(config)`: the same tree with a tuple of logical axis names per weight,
- `init_params(config, seed, dtype)`: random weights (tests, synthetic benchmarks).

Param paths are tuples of dict keys, e.g. `("layers", "full", "attn", "q")`; weights under
`layers` carry a leading axis of `num_layer_pairs` (Hugging Face layer 2p is `sliding`[p], 2p+1 is
`full`[p]).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.axes import LAYERS
from gptoss_jax.config import Config
from gptoss_jax.model import Params, Transformer, abstract_model
from gptoss_jax.ops import parallel
from gptoss_jax.quant import is_quantized

Path = tuple[str, ...]
LAYER_AXIS = LAYERS


def _abstract_state(config: Config, dtype: Any) -> nnx.State:
    return nnx.state(abstract_model(config, dtype))


def abstract_params(config: Config, dtype: Any = jnp.bfloat16) -> Params:
    """Pytree of `jax.ShapeDtypeStruct` shaped like `init_params(config, ..., dtype)`; allocates nothing."""
    return nnx.to_pure_dict(_abstract_state(config, dtype))


def logical_axes(config: Config) -> Params:
    """Pytree of logical axis-name tuples, one per weight (stacked weights start with `layers`)."""

    def axes(variable: nnx.Variable) -> Any:
        names = tuple(variable.get_metadata()["axes"])
        value = variable.get_value()
        stacked = len(value.shape) - len(names)
        assert stacked in (0, 1), (names, value.shape)
        names = (LAYER_AXIS,) * stacked + names
        return type(value).part_axes(names) if is_quantized(value) else names

    state = _abstract_state(config, jnp.float32)
    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def init_params(config: Config, seed: int = 0, dtype: Any = jnp.bfloat16, mesh: jax.sharding.Mesh | None = None
                ) -> Params:
    """Random weights for `config` (uniform, fan-in scaled; biases and sinks nonzero). Norm scales
    stay float32 whatever `dtype`, as in the released checkpoints' transformers model.

    With `mesh` (from `gptoss_jax.sharding.make_mesh`), each weight is created directly in its
    shards (`gptoss_jax.sharding.param_shardings`); the values do not depend on the mesh.
    """
    return _initializer(config, jnp.dtype(dtype), mesh)(jax.random.key(seed))


@functools.lru_cache(maxsize=16)
def _initializer(config: Config, dtype: Any, mesh: jax.sharding.Mesh | None) -> Callable[[jax.Array], Params]:
    """`init_params`'s jitted program for one (config, dtype, mesh), the key traced: calls with
    other seeds reuse its trace and compilation (tracing and compiling a model's initialization took
    5 s per call for tiny-a with gpt-oss's vocabulary at -O0, 13 s at -O2)."""
    def make(key: jax.Array) -> Params:
        return nnx.to_pure_dict(nnx.state(Transformer(config, dtype, nnx.Rngs(key))))

    if mesh is None:
        return jax.jit(make)
    return jax.jit(make, out_shardings=parallel.param_shardings(config, mesh))


def dequantize_experts(config: Config, params: Params, dtype: Any = None) -> tuple[Config, Params]:
    """(dense config, params) equal to quantized `params` with every quantized weight decoded to the
    dense layout in `dtype` (default: the expert biases' dtype); a dense config's params as they are."""
    if config.expert_format == "dense":
        return config, params

    def decode(path: Any, leaf: Any) -> Any:
        if not is_quantized(leaf):
            return leaf
        if dtype is None:  # the sibling bias's dtype
            node = params
            for key in path[:-1]:
                node = node[key.key]
            return leaf.dequantize(node[f"{path[-1].key}_bias"].dtype)
        return leaf.dequantize(dtype)

    dense = jax.tree_util.tree_map_with_path(decode, params, is_leaf=is_quantized)
    return dataclasses.replace(config, expert_format="dense"), dense


def flatten(params: Params) -> dict[Path, Any]:
    """{param path: leaf} for a params-shaped pytree (tuples, such as logical axes, are leaves)."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {tuple(key_name(k) for k in path): leaf for path, leaf in leaves}


def key_name(key: Any) -> str:
    """The name of one pytree path entry (a dict key, or a typed weight's field)."""
    return str(getattr(key, "key", getattr(key, "name", key)))


def unflatten(flat: Mapping[Path, Any], like: Any = None) -> Params:
    """Inverse of `flatten`: nested dicts, or with `like` (a params-shaped tree, e.g. `abstract_params`)
    its structure, typed weights included."""
    if like is not None:
        paths = flatten(like)
        return jax.tree_util.tree_unflatten(jax.tree.structure(like), [flat[p] for p in paths])
    tree: Params = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


# ---------------------------------------------------------------------------------------------
# Hugging Face names <-> param paths

@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one Hugging Face tensor lives in the params, and how its layout differs.

    `to_param` maps the HF array (torch layout, [out, in] for linear weights) to the param's layout
    (one layer's slice for stacked weights); `to_hf` is its inverse.
    """

    name: str
    path: Path
    layer_pair: int | None
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _per_layer_table(c: Config) -> dict[str, tuple[Path, Callable, Callable]]:
    d, n, k, h = c.hidden, c.num_heads, c.num_kv_heads, c.head_dim

    def linear(heads: int) -> tuple[Callable, Callable]:  # [heads*h, d] <-> [d, heads, h]
        return (lambda a: a.T.reshape(d, heads, h)), (lambda a: a.reshape(d, heads * h).T)

    def bias(heads: int) -> tuple[Callable, Callable]:  # [heads*h] <-> [heads, h]
        return (lambda a: a.reshape(heads, h)), (lambda a: a.reshape(heads * h))

    transpose = (lambda a: a.T), (lambda a: a.T)
    return {
        "input_layernorm.weight": (("attn_norm", "scale"), _same, _same),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), _same, _same),
        "self_attn.q_proj.weight": (("attn", "q"), *linear(n)),
        "self_attn.q_proj.bias": (("attn", "q_bias"), *bias(n)),
        "self_attn.k_proj.weight": (("attn", "k"), *linear(k)),
        "self_attn.k_proj.bias": (("attn", "k_bias"), *bias(k)),
        "self_attn.v_proj.weight": (("attn", "v"), *linear(k)),
        "self_attn.v_proj.bias": (("attn", "v_bias"), *bias(k)),
        "self_attn.o_proj.weight": (("attn", "o"), lambda a: a.T.reshape(n, h, d), lambda a: a.reshape(n * h, d).T),
        "self_attn.o_proj.bias": (("attn", "o_bias"), _same, _same),
        "self_attn.sinks": (("attn", "sinks"), _same, _same),
        "mlp.router.weight": (("mlp", "router"), *transpose),
        "mlp.router.bias": (("mlp", "router_bias"), _same, _same),
        "mlp.experts.gate_up_proj": (("mlp", "gate_up"), _same, _same),
        "mlp.experts.gate_up_proj_bias": (("mlp", "gate_up_bias"), _same, _same),
        "mlp.experts.down_proj": (("mlp", "down"), _same, _same),
        "mlp.experts.down_proj_bias": (("mlp", "down_bias"), _same, _same),
    }


_GLOBAL_TABLE: dict[str, Path] = {
    "model.embed_tokens.weight": ("embed",),
    "model.norm.weight": ("norm", "scale"),
    "lm_head.weight": ("unembed",),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_tensor(config: Config, name: str) -> HFTensor:
    """The map entry for Hugging Face tensor `name`; KeyError (naming it) for an unknown name."""
    if name in _GLOBAL_TABLE:
        return HFTensor(name, _GLOBAL_TABLE[name], None, _same, _same)
    match = _LAYER_NAME.fullmatch(name)
    table = _per_layer_table(config)
    if match and int(match[1]) < config.num_layers and match[2] in table:
        layer = int(match[1])
        sub, to_param, to_hf = table[match[2]]
        kind = "sliding" if layer % 2 == 0 else "full"
        return HFTensor(name, ("layers", kind, *sub), layer // 2, to_param, to_hf)
    raise KeyError(f"unexpected tensor {name!r}: not a weight of gpt-oss config {config.name!r} "
                   f"({config.num_layers} layers)")


def hf_names(config: Config) -> list[str]:
    """Every Hugging Face tensor name of a dense (non-MXFP4) checkpoint for `config`, in layer order."""
    per_layer = [f"model.layers.{i}.{suffix}" for i in range(config.num_layers)
                 for suffix in _per_layer_table(config)]
    return ["model.embed_tokens.weight", *per_layer, "model.norm.weight", "lm_head.weight"]


def params_from_hf(config: Config, tensors: Mapping[str, np.ndarray], dtype: Any = jnp.bfloat16,
                   source: str = "checkpoint") -> Params:
    """Params from a mapping of Hugging Face names to arrays (all tensors in memory: small models,
    tests). Missing, unexpected or mis-shaped tensors raise ValueError naming `source` and the tensor.
    """
    missing = sorted(set(hf_names(config)) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    abstract = flatten(abstract_params(config, dtype))
    slices: dict[Path, list[np.ndarray | None]] = {}
    flat: dict[Path, Any] = {}
    for name, array in tensors.items():
        try:
            entry = hf_tensor(config, name)
        except KeyError as err:
            raise ValueError(f"{source}: {err.args[0]}") from None
        value = entry.to_param(np.asarray(array))
        target = abstract[entry.path]
        expected = target.shape[1:] if entry.layer_pair is not None else target.shape
        if value.shape != tuple(expected):
            raise ValueError(f"{source}: tensor {name!r} has shape {np.shape(array)}, which does not match "
                             f"config {config.name!r} (expected {tuple(expected)} after layout change)")
        if entry.layer_pair is None:
            flat[entry.path] = jnp.asarray(value, target.dtype)
        else:
            slices.setdefault(entry.path, [None] * config.num_layer_pairs)[entry.layer_pair] = value
    for path, layers in slices.items():
        flat[path] = jnp.asarray(np.stack(layers), abstract[path].dtype)
    return unflatten(flat)


def params_to_hf(config: Config, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array in HF layout) for every weight, one at a time, in layer order."""
    flat = flatten(params)
    for name in hf_names(config):
        entry = hf_tensor(config, name)
        value = flat[entry.path]
        if entry.layer_pair is not None:
            value = value[entry.layer_pair]
        yield name, entry.to_hf(np.asarray(value))


def count_params(config: Config) -> dict[str, int]:
    """Parameter counts from the declared shapes (`jax.eval_shape`, nothing allocated): `total`, and
    `active` per token: all but the experts a token does not use and the embedding table (a lookup)."""
    shapes, axes = flatten(abstract_params(config)), flatten(logical_axes(config))
    total = sum(int(np.prod(s.shape)) for s in shapes.values())
    per_expert = [p for p, names in axes.items()  # [experts, ...] weights; not the router's [experts] bias
                  if names[names[0] == LAYER_AXIS:][:1] == ("experts",) and len(names) > 2]
    expert = sum(int(np.prod(shapes[p].shape)) for p in per_expert)
    unused_experts = expert * (config.num_experts - config.experts_per_token) // config.num_experts
    return {"total": total, "active": total - unused_experts - int(np.prod(shapes[("embed",)].shape))}
