"""bfloat16 weights and KV caches passed to jitted steps as their raw bits, on CPU.

XLA:CPU has no bfloat16 dynamic-slice: when a jitted step slices a bfloat16 weight (one layer of
the stacked layers, one token's embedding row, one expert) it converts the WHOLE weight to float32
first, outside the layer loop: 2.7 GB of temporaries per gpt-oss-20b prefill step and 5.0 GB per
decode step, with the memory traffic to match. `as_bits` gives the step uint16 views of the same
buffers instead (no copy); the model slices the bits and bitcasts only the slice (`read`).
A bfloat16 KV cache has the same problem (a step slicing and updating a 128k-slot gpt-oss-20b
cache converted all 3 GiB of it to float32, twice: 8.1 GiB of decode-step temporaries): steps take
and return it as bits too, written through `stored` and read a block at a time through `read`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BITS = jnp.uint16
"""Stand-in dtype of bfloat16 weights passed as their raw bits."""


def as_bits(params: Any) -> Any:
    """params with each bfloat16 weight replaced by a uint16 view of the same buffer (made through
    numpy, which shares it), for single-device CPU arrays; every other leaf as it is. The model
    accepts either."""
    def view(a: Any) -> Any:
        if (not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer) or a.dtype != jnp.bfloat16
                or len(a.devices()) != 1 or next(iter(a.devices())).platform != "cpu"):
            return a
        return jax.device_put(np.asarray(a).view(np.uint16), a.sharding)

    return jax.tree.map(view, params)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """Layer `index` of a stacked weight [layers, ...], not sliced yet: `read` slices it where it is
    used, and a native CPU kernel takes the whole stack with the index instead and reads the layer
    in place (`ops.matmul`'s projections; XLA would copy a slice a custom call takes: gpt-oss-20b's
    attention weights, 1.3 GB per decode step)."""

    stacked: jax.Array
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stacked.shape[1:]

    @property
    def dtype(self) -> Any:
        return self.stacked.dtype


def read(table: jax.Array | LayerView, index: Any = None) -> jax.Array:
    """table[index] (the whole table with `index` None), as bfloat16 when `table` holds bits, else
    as stored."""
    if isinstance(table, LayerView):
        table = take(table.stacked, table.index)
    value = table if index is None else take(table, index)
    return jax.lax.bitcast_convert_type(value, jnp.bfloat16) if table.dtype == BITS else value


def take(table: jax.Array, index: Any) -> jax.Array:
    """table[index]; a scalar integer index (a layer, a group: never negative here) as one
    dynamic_slice, without the negative-index arithmetic `table[index]` traces for every dimension
    (11 operations -> 2 per read: a fifth of a tiny model's forward program, traced and compiled
    in every step)."""
    if isinstance(index, (int, np.integer)) and index >= 0 or (
            isinstance(index, jax.Array) and index.ndim == 0 and jnp.issubdtype(index.dtype, jnp.integer)):
        start = (index, *(0,) * (table.ndim - 1))
        return jax.lax.dynamic_slice(table, start, (1, *table.shape[1:]),
                                     allow_negative_indices=False).reshape(table.shape[1:])
    return table[index]


def stored(values: jax.Array, like: jax.Array) -> jax.Array:
    """values as `like` stores them: its bits when `like` holds bits, else cast to its dtype."""
    if like.dtype == BITS:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), BITS)
    return values.astype(like.dtype)


def value_dtype(table: jax.Array | LayerView) -> Any:
    """The dtype `read` gives for `table`."""
    return jnp.bfloat16 if table.dtype == BITS else table.dtype


def layer_slice(tree: Any, index: jax.Array, keep: tuple[str, ...], views: tuple[str, ...] = ()) -> Any:
    """One layer's slice of stacked params `tree` (each leaf's `index`-th entry along axis 0, read as
    above), except the weights under a key in `keep`, which stay stacked (read in place later; a
    typed weight with `at_layer` slices the parts it wants sliced, e.g. LoRA factors), and the plain
    arrays under a key in `views`, which become `LayerView`s."""
    def one(path: Any, node: Any) -> Any:
        key = str(getattr(path[-1], "key", "")) if path else ""
        if key in keep:
            return node.at_layer(index, read) if hasattr(node, "at_layer") else node
        if key in views and isinstance(node, jax.Array):
            return LayerView(node, index)
        return jax.tree.map(lambda leaf: read(leaf, index), node)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda node: dataclasses.is_dataclass(node))
