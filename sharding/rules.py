"""The one table from the model's logical axis names to mesh axes, and what follows from it.

Model code (gptoss_jax/) names logical axes only: each weight's `axes` metadata in `model.py`, and
activations through `constrain`. This file alone decides where they go on the mesh:

    weights      embed -> fsdp, q_heads / kv_heads -> tensor, experts -> expert,
                 expert_mlp -> tensor, vocab -> tensor; head_dim, layers, router_experts unsplit
    activations  batch -> (data, fsdp, expert), seq / act_embed unsplit, act_vocab -> tensor
    KV cache     cache_batch -> (data, fsdp, expert), cache_kv_heads -> tensor; slots unsplit

Consequences, for a mesh expert=E x tensor=T: each device holds 1/(E*T) of the expert matrices,
1/T of the attention weights and of the (un)embedding; attention runs tensor-parallel over heads
and data-parallel over the expert axis; the experts run in `moe.py`'s shard_map.

Weights must divide evenly (a clear ValueError otherwise), with one exception: `kv_heads` is
replicated when the tensor axis is larger than the number of KV heads (gpt-oss has 8: with
tensor=16 each device keeps all 8 KV heads, as each query head still needs its KV head).
Activation dimensions that do not divide (a decode batch of 1 on expert=8) take the longest prefix
of their axes that does, and are replicated over the rest. The KV cache follows the activation
rule, so its KV heads are replicated when the tensor axis does not divide them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from gptoss_jax import cache as kv_cache, params as params_lib
from gptoss_jax.config import Config
from gptoss_jax.sharding.mesh import MESH_AXES, axis_sizes, parse_mesh_spec

RULES: dict[str, tuple[str, ...]] = {
    # weights (names from model.py's `axes` metadata; `layers` is the scanned layer-pair axis)
    "layers": (),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "experts": ("expert",),
    "router_experts": (),  # the router is tiny and every token needs all its logits: replicated
    "mxfp4_bytes": (),  # the 16 bytes of an MXFP4 block (its blocks split along their own logical axis)
    "expert_mlp": ("tensor",),
    "vocab": ("tensor",),
    # LoRA adapters (axes.py's LORA_AXES): whole rows, small enough not to split over fsdp
    "lora_rank": (),
    "lora_embed": (),
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "act_embed": (),
    "act_vocab": ("tensor",),
    # the KV cache (axes.py's CACHE_AXES; `layers` and `head_dim` as above): the batch as the
    # activations' batch and the KV heads as the K/V weights, so attention uses its shard in place
    "cache_batch": ("data", "fsdp", "expert"),
    "cache_slots": (),
    "cache_kv_heads": ("tensor",),
}
"""Logical axis -> mesh axes (in MESH_AXES order). A mesh axis of size 1 is left out of specs."""

REPLICATE_WHEN_FEWER = frozenset({"kv_heads"})
"""Logical axes that are replicated, not an error, when their mesh axes outnumber the dimension."""

PRESETS: dict[str, tuple[str, str]] = {
    "gpu-8": ("expert=8", "one host, 8 GPUs, serving: experts split 8 ways, attention data-parallel "
                          "over the batch (120b in bfloat16: ~30 GB of weights per GPU)"),
    "gpu-8-tp": ("expert=4,tensor=2", "one host, 8 GPUs, low-latency decode: attention heads and "
                                      "expert columns split 2 ways, experts 4 ways"),
    "gpu-8-train": ("fsdp=2,expert=4", "one host, 8 GPUs, fine-tuning: experts 4 ways, every weight "
                                       "also split along embed over fsdp, batch over fsdp and expert"),
    "tpu-v5e-8": ("expert=4,tensor=2", "TPU v5e-8 (8 chips x 16 GB): 20b (120b does not fit in "
                                       "bfloat16); same layout as gpu-8-tp"),
    "tpu-v5p-8": ("expert=4", "TPU v5p-8 (4 chips x 95 GB): experts 4 ways"),
    "tpu-v5p-32": ("expert=8,tensor=2", "TPU v5p-32 (16 chips): experts 8 ways, tensor 2 ways"),
    "hosts-2x8": ("data=2,expert=4,tensor=2", "2 hosts x 8 GPUs: one model copy per host (data "
                                              "crosses hosts), experts and tensor inside a host"),
}
"""Mesh specs for typical machines: name -> (spec, when to use it)."""

Sizes = Mapping[str, int]


def _entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def check_no_collision(logical: Sequence[str | None], rules: Mapping[str, tuple[str, ...]] = RULES) -> None:
    """ValueError if two logical axes of one tensor map to the same mesh axis (the rule table would
    ask the tensor to be split twice over one axis)."""
    seen: dict[str, str] = {}
    for name in logical:
        if name is None:
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {', '.join(rules)})")
        for axis in rules[name]:
            if axis in seen:
                raise ValueError(f"logical axes {seen[axis]!r} and {name!r} of one tensor {tuple(logical)} "
                                 f"both map to mesh axis {axis!r}")
            seen[axis] = name


def weight_spec(logical: Sequence[str], shape: Sequence[int], sizes: Sizes, what: str = "weight") -> P:
    """PartitionSpec of one weight: every mapped mesh axis (size > 1) must divide its dimension,
    except `REPLICATE_WHEN_FEWER` axes larger than the mesh axes, which are replicated."""
    check_no_collision(logical)
    entries = []
    for name, dim in zip(logical, shape, strict=True):
        axes = [a for a in RULES[name] if sizes[a] > 1]
        split = math.prod(sizes[a] for a in axes)
        if dim % split:
            if name in REPLICATE_WHEN_FEWER and split > dim:
                axes = []
            else:
                raise ValueError(f"{what}: dimension {name!r} ({dim}) is not divisible by mesh "
                                 + " x ".join(f"{a}={sizes[a]}" for a in axes))
        entries.append(_entry(axes))
    return P(*entries)


def activation_spec(logical: Sequence[str | None], shape: Sequence[int], sizes: Sizes) -> P:
    """PartitionSpec of an activation: each dimension split over the longest prefix of its mesh
    axes that divides it (a decode batch smaller than the data-parallel degree stays replicated)."""
    check_no_collision(logical)
    entries = []
    for name, dim in zip(logical, shape, strict=True):
        axes: list[str] = []
        for axis in RULES[name] if name is not None else ():
            if sizes[axis] == 1:
                continue
            if dim % (math.prod(sizes[a] for a in axes) * sizes[axis]):
                break
            axes.append(axis)
        entries.append(_entry(axes))
    return P(*entries)


def check_config(config: Config, sizes: Sizes) -> None:
    """ValueError naming every way `config` does not fit a mesh of `sizes` (before any weight is made)."""
    t, e, f = sizes["tensor"], sizes["expert"], sizes["fsdp"]
    problems = []
    if config.num_experts % e:
        problems.append(f"num_experts ({config.num_experts}) % expert ({e}) != 0")
    if config.intermediate % t:  # gate/up columns interleave: each shard needs whole pairs
        problems.append(f"intermediate ({config.intermediate}) % tensor ({t}) != 0")
    if config.num_heads % t:
        problems.append(f"num_heads ({config.num_heads}) % tensor ({t}) != 0")
    if config.num_kv_heads % t and t < config.num_kv_heads:
        problems.append(f"num_kv_heads ({config.num_kv_heads}) % tensor ({t}) != 0 (KV heads are "
                        "replicated only when tensor > num_kv_heads)")
    if config.vocab_size % t:
        problems.append(f"vocab_size ({config.vocab_size}) % tensor ({t}) != 0")
    if config.hidden % f:
        problems.append(f"hidden ({config.hidden}) % fsdp ({f}) != 0")
    if config.expert_format == "mxfp4":  # MXFP4 splits the contracted dimension in whole 32-value blocks
        if (config.intermediate // 32) % t:
            problems.append(f"MXFP4 blocks of intermediate ({config.intermediate // 32}) % tensor ({t}) != 0")
        if (config.hidden // 32) % f:
            problems.append(f"MXFP4 blocks of hidden ({config.hidden // 32}) % fsdp ({f}) != 0")
    if problems:
        mesh = ",".join(f"{a}={s}" for a, s in sizes.items() if s > 1)
        raise ValueError(f"config {config.name!r} does not fit mesh {mesh!r}: " + "; ".join(problems))


def partition_specs(config: Config, mesh: Any) -> Any:
    """Pytree of PartitionSpec shaped like `params.abstract_params(config)`.

    `mesh`: a Mesh, an AbstractMesh, a spec string ("expert=4,tensor=2", no -1) or {axis: size}.
    """
    sizes = _sizes(mesh)
    check_config(config, sizes)
    shapes = params_lib.abstract_params(config)
    logical = params_lib.logical_axes(config)

    def spec(path: Any, axes: tuple[str, ...], shape: jax.ShapeDtypeStruct) -> P:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return weight_spec(axes, shape.shape, sizes, what=f"config {config.name!r} weight {name}")

    return jax.tree_util.tree_map_with_path(spec, logical, shapes, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(config: Config, mesh: jax.sharding.Mesh) -> Any:
    """Pytree of NamedSharding with exactly the structure of `params.abstract_params(config)`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(config, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def _sizes(mesh: Any) -> dict[str, int]:
    if isinstance(mesh, str):
        sizes = parse_mesh_spec(mesh)
        if -1 in sizes.values():
            raise ValueError(f"mesh spec {mesh!r}: -1 needs devices to resolve; pass a Mesh instead")
        return {name: sizes.get(name, 1) for name in MESH_AXES}
    return axis_sizes(mesh)


def cache_specs(cache: Any, mesh: Any) -> Any:
    """Pytree of PartitionSpec shaped like `cache` (a KV cache of arrays or ShapeDtypeStructs, see
    gptoss_jax/cache.py), each leaf split by `activation_spec` on its `CACHE_AXES`: the batch over
    the longest prefix of (data, fsdp, expert) that divides it, KV heads over tensor when it divides
    them (replicated otherwise). `mesh`: as for `partition_specs`."""
    sizes = _sizes(mesh)
    if set(cache) != set(kv_cache.KINDS):
        raise ValueError(f"not a KV cache: top-level keys {sorted(cache)}, expected {list(kv_cache.KINDS)}")
    return jax.tree.map(lambda axes, leaf: activation_spec(axes, leaf.shape, sizes), kv_cache.logical_axes(),
                        cache, is_leaf=lambda x: isinstance(x, tuple))


def spec_table(config: Config, mesh: Any) -> dict[str, list[str | list[str] | None]]:
    """{"layers/full/mlp/gate_up": [None, "expert", None, "tensor"], ...}: partition_specs as JSON-able
    rows (the golden files in tests/fixtures)."""
    def row(spec: P) -> list[str | list[str] | None]:
        return [list(e) if isinstance(e, tuple) else e for e in spec]

    flat = jax.tree_util.tree_flatten_with_path(partition_specs(config, mesh),
                                                is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): row(spec) for path, spec in flat}
