"""Mixture of experts on one device: top-k routing and dropless expert compute.

Tokens are sorted by expert so that each expert multiplies only the tokens routed to it (no
capacity factor, no dropped tokens, no dense compute of every expert for every token).

Dimension letters: m tokens (batch x sequence), a token-expert assignments (m x k), d hidden,
e experts, i expert intermediate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(x: jax.Array, router: jax.Array, router_bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Router in float32: top-k on the logits, softmax over those k.

    x [..., d], router [d, e], router_bias [e] -> (expert ids int32 [..., k], weights float32 [..., k]).
    With a `gptoss_jax.sharding` mesh set, each batch shard routes its own tokens (`sharding/moe.py`).
    """
    if not jax.sharding.get_abstract_mesh().empty:
        from gptoss_jax.sharding import moe as sharded  # deferred: gptoss_jax.sharding imports the model

        if sharded.handles_mesh():
            return sharded.route(x, router, router_bias, top_k)
    logits = jnp.einsum("...d,de->...e", x, router, preferred_element_type=jnp.float32)
    logits = logits + router_bias.astype(jnp.float32)
    top_logits, expert_ids = jax.lax.top_k(logits, top_k)
    return expert_ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)


def expert_matmul(x_sorted: jax.Array, weights: jax.Array, group_sizes: jax.Array,
                  layer: jax.Array | None = None) -> jax.Array:
    """The one grouped matmul of the experts: rows of x_sorted [a, in] belong to consecutive experts
    (group_sizes [e] rows each); weights [e, in, out], or [layers, e, in, out] with `layer` the index
    to use (so a scan over layers reads the weights in place) -> float32 [a, out].

    Rows are laid out in tiles of `tile` rows, each tile holding one expert's rows (zero-padded),
    and a `jax.lax.scan` multiplies each tile by its expert's matrix, read in place by a dynamic
    index: every routed expert's weights are read once per tile, unrouted experts never. (XLA's
    CPU `ragged_dot` is ~30x slower than this, and gathering weights per row copies them.)
    """
    rows, num_experts = x_sorted.shape[0], weights.shape[-3]
    tile = int(min(128, max(1, rows // num_experts)))
    num_tiles = (rows + min(num_experts, rows) * (tile - 1)) // tile  # upper bound on tiles in use
    padded_sizes = (group_sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded_sizes)
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    expert_of_row = jnp.repeat(jnp.arange(num_experts), group_sizes, total_repeat_length=rows)
    slot = padded_ends[expert_of_row] - padded_sizes[expert_of_row] + jnp.arange(rows) - group_starts[expert_of_row]
    x_tiles = jnp.zeros((num_tiles * tile, x_sorted.shape[1]), x_sorted.dtype).at[slot].set(x_sorted)
    x_tiles = x_tiles.reshape(num_tiles, tile, -1)
    tile_starts = jnp.arange(num_tiles) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(padded_ends, tile_starts, side="right"), num_experts - 1)
    in_use = tile_starts < padded_ends[-1]

    def one_tile(_: None, tile_args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        x_tile, expert, used = tile_args
        if layer is None:
            matrix = jax.lax.dynamic_index_in_dim(weights, expert, keepdims=False)
        else:
            matrix = jax.lax.dynamic_slice(weights, (layer, expert, 0, 0), (1, 1, *weights.shape[2:]))[0, 0]
        product = jax.lax.cond(used, lambda: jnp.dot(x_tile, matrix, preferred_element_type=jnp.float32),
                               lambda: jnp.zeros((tile, weights.shape[-1]), jnp.float32))
        return None, product

    _, y_tiles = jax.lax.scan(one_tile, None, (x_tiles, tile_expert, in_use))
    return y_tiles.reshape(num_tiles * tile, -1)[slot]


def swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU on interleaved columns: gate = [..., 0::2], up = [..., 1::2].

    gate_up [..., 2i] -> [..., i], float32: min(gate, limit) * sigmoid(alpha * gate) * (clip(up) + 1).
    """
    gate = jnp.minimum(gate_up[..., 0::2], limit)
    up = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1)


def experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: jax.Array,
            gate_up_bias: jax.Array, down: jax.Array, down_bias: jax.Array, *, alpha: float,
            limit: float, layer: jax.Array | None = None) -> jax.Array:
    """Weighted sum of each token's routed experts.

    x [..., d]; expert_ids, expert_weights [..., k]; gate_up [e, d, 2i]; gate_up_bias [e, 2i];
    down [e, i, d]; down_bias [e, d] -> float32 [..., d]. With `layer`, gate_up and down are the
    stacked [layers, e, ...] matrices of every layer (see `expert_matmul`).

    With a device mesh of `gptoss_jax.sharding` set (`jax.set_mesh`), the experts run expert- and
    tensor-parallel there (`sharding/moe.py`); this function is the one-device computation.
    """
    if not jax.sharding.get_abstract_mesh().empty:
        from gptoss_jax.sharding import moe as sharded  # deferred: gptoss_jax.sharding imports the model

        if sharded.handles_mesh():
            return sharded.experts(x, expert_ids, expert_weights, gate_up, gate_up_bias, down, down_bias,
                                   alpha=alpha, limit=limit, layer=layer)
    shape, top_k, num_experts = x.shape, expert_ids.shape[-1], gate_up.shape[-3]
    tokens = x.reshape(-1, shape[-1])
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # assignments sorted by expert
    sorted_ids = flat_ids[order]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    x_sorted = tokens[order // top_k]
    hidden = expert_matmul(x_sorted, gate_up, group_sizes, layer) + gate_up_bias[sorted_ids].astype(jnp.float32)
    activated = swiglu(hidden, alpha, limit).astype(x.dtype)
    y_sorted = expert_matmul(activated, down, group_sizes, layer) + down_bias[sorted_ids].astype(jnp.float32)

    unsort = jnp.argsort(order)
    y = y_sorted[unsort].reshape(-1, top_k, shape[-1])
    out = jnp.einsum("mkd,mk->md", y, expert_weights.reshape(-1, top_k).astype(jnp.float32))
    return out.reshape(shape)
