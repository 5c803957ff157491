"""Mixture of experts on one device: top-k routing and dropless expert compute.

Tokens are sorted by expert so that each expert multiplies only the tokens routed to it (no
capacity factor, no dropped tokens, no dense compute of every expert for every token).

Dimension letters: m tokens (batch x sequence), a token-expert assignments (m x k), d hidden,
e experts, i expert intermediate.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gptoss_jax import bits, mxfp4

ExpertMatrix = jax.Array | dict[str, jax.Array]
"""An expert matrix: dense [(layers,) g, in, out], or MXFP4 {"blocks" uint8 [(layers,) g, out, 16, in/32],
"scales" uint8 [(layers,) g, out, in/32]} (see `gptoss_jax.mxfp4`)."""


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


_SAVE_PRODUCTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
"""In the backward pass of a tile: keep products, re-read the weight slice (never saved per tile)."""


def expert_matmul(x: jax.Array, weights: ExpertMatrix, group_sizes: jax.Array, layer: jax.Array | None = None,
                  lora: dict[str, jax.Array] | None = None, tile: int | None = None) -> jax.Array:
    """The one grouped matmul of the experts, used on one device and inside `sharding/`'s shard_map.

    Rows of x [rows, in] grouped consecutively (group_sizes [g]) times weights [g, in, out] (or
    [layers, g, in, out] and `layer`: a scan over layers then reads the weights in place, where a
    slice taken outside would be copied), plus (x @ a[g]) @ b[g] with a LoRA {"a" [g, in, r],
    "b" [g, r, out]} -> float32 [rows, out], zero past the last group.

    Dense weights: `jax.lax.ragged_dot` (a grouped GEMM) on GPU and TPU; on CPU, where XLA lowers
    ragged_dot to a masked dense product ~30x slower, `_tiled_grouped_matmul`. MXFP4 weights (a
    dict, see `ExpertMatrix`): `_tiled_grouped_matmul` everywhere, which decodes only the experts
    that have rows, a few output rows at a time (`mxfp4.matmul`), so no dense copy ever exists."""
    if isinstance(weights, dict):
        return _tiled_grouped_matmul(x, weights, group_sizes, layer=layer, tile=tile, lora=lora)
    cpu = functools.partial(_tiled_grouped_matmul, layer=layer, tile=tile, lora=lora)
    return jax.lax.platform_dependent(x, weights, group_sizes, cpu=cpu,
                                      default=functools.partial(_ragged_dot, layer=layer, lora=lora))


def _ragged_dot(x: jax.Array, weights: jax.Array, group_sizes: jax.Array, layer: jax.Array | None,
                lora: dict[str, jax.Array] | None) -> jax.Array:
    if layer is not None:
        weights = jax.lax.dynamic_index_in_dim(weights, layer, keepdims=False)
    y = jax.lax.ragged_dot(x, weights, group_sizes, preferred_element_type=jnp.float32)
    if lora is not None:
        low = jax.lax.ragged_dot(x.astype(lora["a"].dtype), lora["a"], group_sizes, preferred_element_type=jnp.float32)
        y = y + jax.lax.ragged_dot(low, lora["b"], group_sizes, preferred_element_type=jnp.float32)
    return y


def tile_rows(rows_per_group: int) -> int:
    """Power of two >= the rows a group gets on average, in [8, 128]."""
    return int(min(128, max(8, 1 << max(0, math.ceil(math.log2(max(1, rows_per_group)))))))


def _tiled_grouped_matmul(x: jax.Array, weights: ExpertMatrix, group_sizes: jax.Array,
                          layer: jax.Array | None = None, tile: int | None = None,
                          lora: dict[str, jax.Array] | None = None) -> jax.Array:
    """Grouped matmul that computes only the rows in groups (XLA:CPU lowers ragged_dot to a masked
    product with every group, groups x rows of work).

    Each group's rows are padded to whole tiles, so a tile belongs to one group; a scan over the
    (static) worst-case tile count multiplies the used tiles by their group's weights and skips
    the rest. Differentiable (scan + cond), for fine-tuning.
    """
    quantized = isinstance(weights, dict)
    if quantized:
        rows, (groups, columns) = x.shape[0], weights["blocks"].shape[-4:-2]
    else:
        rows, (groups, _, columns) = x.shape[0], weights.shape[-3:]
    tile = tile or tile_rows(rows // groups)
    # sum_g ceil(n_g / tile) <= rows / tile + (groups with rows): 5 tiles, not 33, for a decode token's 4 rows
    num_tiles = -(-rows // tile) + min(groups, rows)
    ends = jnp.cumsum(group_sizes)
    padded = (group_sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded)
    row = jnp.arange(rows)
    group = jnp.searchsorted(ends, row, side="right")  # `groups` for rows past the last group
    valid = group < groups
    group = jnp.minimum(group, groups - 1)
    slot = jnp.where(valid, padded_ends[group] - padded[group] + row - (ends[group] - group_sizes[group]),
                     num_tiles * tile)
    x_tiles = jnp.zeros((num_tiles * tile, x.shape[1]), x.dtype).at[slot].set(x, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right"),
                             groups - 1)
    used = padded_ends[-1] // tile

    def matrix(g: jax.Array) -> jax.Array:  # read in place: a slice taken outside would be copied
        if layer is None:
            w = jax.lax.dynamic_index_in_dim(weights, g, keepdims=False)
        else:
            w = jax.lax.dynamic_slice(weights, (layer, g, 0, 0), (1, 1, *weights.shape[2:]))[0, 0]
        return bits.read(w)  # bfloat16 weights may come as their bits, sliced as such

    def weight_product(x_tile: jax.Array, g: jax.Array) -> jax.Array:
        if quantized:
            index = (g,) if layer is None else (layer, g)
            return mxfp4.matmul(x_tile, weights["blocks"], weights["scales"], index)
        return jnp.dot(x_tile, matrix(g), preferred_element_type=jnp.float32)

    def weight_probe(g: jax.Array) -> jax.Array:  # one weight value, for typing the zero branch
        if quantized:
            scales = weights["scales"]
            return jax.lax.dynamic_slice(scales, (*((layer,) if layer is not None else ()), g, 0, 0),
                                         (1,) * scales.ndim).reshape(1, 1)
        return matrix(g)[:1, :1]

    def product(x_tile: jax.Array, g: jax.Array) -> jax.Array:
        y = weight_product(x_tile, g)
        if lora is not None:
            a, b = (jax.lax.dynamic_index_in_dim(lora[p], g, keepdims=False) for p in ("a", "b"))
            low = jnp.dot(x_tile.astype(a.dtype), a, preferred_element_type=jnp.float32)
            y = y + jnp.dot(low, b, preferred_element_type=jnp.float32)
        return y

    def typed_zeros(x_tile: jax.Array, g: jax.Array) -> jax.Array:  # [tile, columns], no matmul
        factors = [x_tile[:, :1], weight_probe(g)] + ([lora["a"][g, :1, :1], lora["b"][g, :1, :1]] if lora else [])
        return functools.reduce(lambda acc, f: acc * (0 * f).astype(jnp.float32), factors,
                                jnp.zeros((tile, columns), jnp.float32))

    def one_tile(_, inputs):
        t, x_tile, g = inputs
        y = jax.lax.cond(t < used,
                         lambda: product(x_tile, g),
                         # zeros typed like the product (inside shard_map, both branches must vary
                         # over the same mesh axes)
                         lambda: typed_zeros(x_tile, g))
        return None, y

    # Under differentiation (fine-tuning), recompute each tile's weight read in the backward pass
    # instead of saving every tile's [in, out] slice as a residual (a no-op for inference).
    one_tile = jax.checkpoint(one_tile, prevent_cse=False, policy=_SAVE_PRODUCTS)
    _, y_tiles = jax.lax.scan(one_tile, None, (jnp.arange(num_tiles), x_tiles.reshape(num_tiles, tile, -1),
                                               tile_group))
    y = y_tiles.reshape(num_tiles * tile, -1)[jnp.minimum(slot, num_tiles * tile - 1)]
    return jnp.where(valid[:, None], y, 0.0)


def swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU on interleaved columns: gate = [..., 0::2], up = [..., 1::2].

    gate_up [..., 2i] -> [..., i], float32: min(gate, limit) * sigmoid(alpha * gate) * (clip(up) + 1).
    """
    gate = jnp.minimum(gate_up[..., 0::2], limit)
    up = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1)


def experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: ExpertMatrix,
            gate_up_bias: jax.Array, down: ExpertMatrix, down_bias: jax.Array, *, alpha: float,
            limit: float, layer: jax.Array | None = None, lora: dict[str, dict[str, jax.Array]] | None = None
            ) -> jax.Array:
    """Weighted sum of each token's routed experts.

    x [..., d]; expert_ids, expert_weights [..., k]; gate_up [e, d, 2i]; gate_up_bias [e, 2i];
    down [e, i, d]; down_bias [e, d] -> float32 [..., d]. gate_up and down may be MXFP4 (see
    `ExpertMatrix`). With `layer`, gate_up and down are the
    stacked [layers, e, ...] matrices of every layer (see `expert_matmul`).

    With a device mesh of `gptoss_jax.sharding` set (`jax.set_mesh`), the experts run expert- and
    tensor-parallel there (`sharding/moe.py`); this function is the one-device computation.

    `lora`: optional per-expert adapters {"gate_up" | "down": {"a" [e, in, r], "b" [e, r, out]}}
    for this layer (see `expert_matmul`).
    """
    if not jax.sharding.get_abstract_mesh().empty:
        from gptoss_jax.sharding import moe as sharded  # deferred: gptoss_jax.sharding imports the model

        if sharded.handles_mesh():
            if lora is not None:  # passed only when given, so the sharded path keeps its own contract
                return sharded.experts(x, expert_ids, expert_weights, gate_up, gate_up_bias, down, down_bias,
                                       alpha=alpha, limit=limit, layer=layer, lora=lora)
            return sharded.experts(x, expert_ids, expert_weights, gate_up, gate_up_bias, down, down_bias,
                                   alpha=alpha, limit=limit, layer=layer)
    shape, top_k, num_experts = x.shape, expert_ids.shape[-1], gate_up_bias.shape[-2]
    tokens = x.reshape(-1, shape[-1])
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # assignments sorted by expert
    sorted_ids = flat_ids[order]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    x_sorted = tokens[order // top_k]
    lora = lora or {}
    hidden = expert_matmul(x_sorted, gate_up, group_sizes, layer, lora.get("gate_up")) + gate_up_bias[sorted_ids].astype(jnp.float32)
    activated = swiglu(hidden, alpha, limit).astype(x.dtype)
    y_sorted = expert_matmul(activated, down, group_sizes, layer, lora.get("down")) + down_bias[sorted_ids].astype(jnp.float32)

    unsort = jnp.argsort(order)
    y = y_sorted[unsort].reshape(-1, top_k, shape[-1])
    out = jnp.einsum("mkd,mk->md", y, expert_weights.reshape(-1, top_k).astype(jnp.float32))
    return out.reshape(shape)
