"""The KV cache: an explicit pytree, passed into and returned from every jitted step.

    {"sliding": {"k", "v": [pairs, b, kv_heads, window, head_dim], "positions": int32 [b, window]},
     "full":    {"k", "v": [pairs, b, kv_heads, max_len, head_dim], "positions": int32 [b, max_len]}}

K and V are KV-head-major: attention reads a block of slots of one row as a contiguous
[kv_heads, block, head_dim] slab, as its products want it. Token-major [.., slots, kv_heads, ..]
made XLA:CPU transpose every block it read: a batch-1 decode step at 32k tokens, one full layer of
the bench config, 16 ms; kv-major 8.4 ms.

On CPU a bfloat16 cache travels through the jitted steps as its raw bits (uint16; see
`gptoss_jax.ops.bits`): `generate` passes it so; `bits.read` gives the values.

Sliding-window layers keep a ring buffer of `sliding_window` slots (position p lives in slot
p % window), so their memory does not grow with the context; full-attention layers keep one slot
per position. `positions` says which token position each slot holds (-1: empty); every layer of a
kind writes the same slots, so it is stored once per kind.

On a mesh (set with `jax.set_mesh`) the cache is split as `axes.CACHE_AXES` and the rules in
`gptoss_jax.sharding` say: the batch like the activations' batch, KV heads like the K/V weights
(over the tensor axis, replicated when it is larger than the number of KV heads), so attention
reads and writes its shard of the cache without moving it. `constrain` pins a cache to that layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax.axes import CACHE_AXES
from gptoss_jax.config import Config
from gptoss_jax.ops import bits, parallel

Cache = dict[str, Any]
KINDS = ("sliding", "full")


def logical_axes() -> dict[str, dict[str, tuple[str, ...]]]:
    """`CACHE_AXES` for every kind: a pytree shaped like a cache, with tuples of names as leaves."""
    return {kind: dict(CACHE_AXES) for kind in KINDS}


def cache_length(config: Config, kind: str, max_len: int) -> int:
    """Slots per sequence for layers of `kind`."""
    return min(config.sliding_window, max_len) if kind == "sliding" else max_len


def init_cache(config: Config, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    def kind_cache(kind: str) -> dict[str, jax.Array]:
        slots = cache_length(config, kind, max_len)
        shape = (config.num_layer_pairs, batch, config.num_kv_heads, slots, config.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "positions": jnp.full((batch, slots), -1, jnp.int32)}

    return {kind: kind_cache(kind) for kind in KINDS}


def abstract_cache(config: Config, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> Cache:
    """`init_cache`'s shapes as `jax.ShapeDtypeStruct`s (memory accounting, compile from shapes)."""
    return jax.eval_shape(lambda: init_cache(config, batch, max_len, dtype))


def constrain(cache: Cache) -> Cache:
    """The cache with a sharding constraint on each leaf (see `CACHE_AXES`) when a mesh is set with
    `jax.set_mesh`; unchanged otherwise. Use inside `jax.jit` (on the cache a step returns, so that
    no step gathers it) or outside (a device transfer)."""
    return parallel.constrain_tree(cache, logical_axes())


def write_slots(slot_positions: jax.Array, positions: jax.Array, ring: bool) -> jax.Array:
    """Slot index [b, t] where each new token is stored; out of range (dropped) for padding and,
    in a ring, for tokens that a later token of the same chunk overwrites.

    slot_positions [b, s] (current contents), positions [b, t] (negative: padding).
    """
    num_slots = slot_positions.shape[1]
    valid = positions >= 0
    if ring:
        newest = jnp.max(positions, axis=1, keepdims=True)
        valid &= positions > newest - num_slots
        slots = positions % num_slots
    else:
        valid &= positions < num_slots
        slots = positions
    return jnp.where(valid, slots, num_slots)


def scatter(buffer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """buffer [b, s, ...] with values [b, t, ...] written at slots [b, t] (out-of-range: dropped);
    a buffer of bfloat16 bits (`ops.bits`) gets the values' bits."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(bits.stored(values, buffer), mode="drop")


def scatter_layer(buffer: jax.Array, layer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """Stacked K or V [layers, b, k, s, h] with values [b, k, t, h] written at [layer, row, :, slots[row]]
    (out-of-range slots: dropped), in place when the buffer is donated or carried by a loop."""
    rows = jnp.arange(buffer.shape[1])[:, None]
    # indices around a slice: the indexed axes come first, so the update is [b, t, k, h]
    return buffer.at[layer, rows, :, slots].set(bits.stored(values.swapaxes(1, 2), buffer), mode="drop")


def used_bytes(cache: Cache) -> int:
    """Bytes held by the cache's arrays."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
