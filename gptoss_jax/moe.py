"""Mixture of experts: top-k routing and dropless expert compute, on one device.

Tokens are sorted by expert so that each expert multiplies only the tokens routed to it (no
capacity factor, no dropped tokens, no dense compute of every expert for every token). On a mesh
(`gptoss_jax.ops.parallel`), `route` and `experts` run expert- and tensor-parallel instead
(`gptoss_jax.sharding`), with this file's math per device.

Dimension letters: m tokens (batch x sequence), a token-expert assignments (m x k), d hidden,
e experts, i expert intermediate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax.ops import matmul, parallel


def route(x: jax.Array, router: Any, router_bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Router in float32: top-k on the logits, softmax over those k.

    x [..., d], router [d, e] (any weight: a LoRA update is merged), router_bias [e] ->
    (expert ids int32 [..., k], weights float32 [..., k]).
    """
    distribution = parallel.current()
    if distribution is not None:
        return distribution.route(x, router, router_bias, top_k)
    logits = jnp.einsum("...d,de->...e", x, matmul.merged(router), preferred_element_type=jnp.float32)
    logits = logits + router_bias.astype(jnp.float32)
    top_logits, expert_ids = jax.lax.top_k(logits, top_k)
    return expert_ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)


def swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU on interleaved columns: gate = [..., 0::2], up = [..., 1::2].

    gate_up [..., 2i] -> [..., i], float32: min(gate, limit) * sigmoid(alpha * gate) * (clip(up) + 1).
    """
    gate = jnp.minimum(gate_up[..., 0::2], limit)
    up = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1)


def expert_ffn(x_sorted: jax.Array, expert_ids: jax.Array, group_sizes: jax.Array, gate_up: Any,
               gate_up_bias: jax.Array, down: Any, down_bias: jax.Array, *, alpha: float, limit: float,
               layer: jax.Array | None = None, tile: int | None = None, activations: str = "float") -> jax.Array:
    """The experts on rows sorted by expert: x_sorted [a, d], expert_ids [a] (rows past the groups
    are ignored), group_sizes [e] -> float32 [a, d]. gate_up [e, d, 2i], down [e, i, d] are any
    weights (`ops.matmul.grouped_matmul`, which `activations` goes to), stacked over layers when
    `layer` is given."""
    idx = jnp.clip(expert_ids, 0, gate_up_bias.shape[0] - 1)
    hidden = matmul.grouped_matmul(x_sorted, gate_up, group_sizes, layer, tile, activations)
    hidden = hidden + gate_up_bias[idx].astype(jnp.float32)
    activated = swiglu(hidden, alpha, limit).astype(x_sorted.dtype)
    y = matmul.grouped_matmul(activated, down, group_sizes, layer, tile, activations)
    return y + down_bias[idx].astype(jnp.float32)


def experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: Any,
            gate_up_bias: jax.Array, down: Any, down_bias: jax.Array, *, alpha: float,
            limit: float, layer: jax.Array | None = None, valid: jax.Array | None = None,
            activations: str = "float") -> jax.Array:
    """Weighted sum of each token's routed experts.

    x [..., d]; expert_ids, expert_weights [..., k]; gate_up [e, d, 2i]; gate_up_bias [e, 2i];
    down [e, i, d]; down_bias [e, d] -> float32 [..., d]. gate_up and down may be quantized or
    LoRA-adapted; with `layer` they are every layer's [layers, e, ...] (see `grouped_matmul`).
    Tokens where `valid` bool [...] is False (padding) skip the experts on one device: their rows
    sort past the last group, so an idle decode slot or a prompt chunk's padding multiplies no
    expert weight, and their output is zero (the mesh path computes them as any token).
    `activations`: `Config.expert_activations` (one device only).
    """
    distribution = parallel.current()
    if distribution is not None:
        return distribution.experts(x, expert_ids, expert_weights, gate_up, gate_up_bias, down, down_bias,
                                    alpha=alpha, limit=limit, layer=layer)
    shape, top_k, num_experts = x.shape, expert_ids.shape[-1], gate_up_bias.shape[-2]
    tokens = x.reshape(-1, shape[-1])
    flat_ids = expert_ids.reshape(-1)
    if valid is not None:  # padding to a sentinel expert past the last: sorted last, in no group
        flat_ids = jnp.where(jnp.repeat(valid.reshape(-1), top_k), flat_ids, num_experts)
    order = jnp.argsort(flat_ids, stable=True)  # assignments sorted by expert
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    y_sorted = expert_ffn(tokens[order // top_k], flat_ids[order], group_sizes, gate_up, gate_up_bias, down,
                          down_bias, alpha=alpha, limit=limit, layer=layer, activations=activations)
    if valid is not None:  # whatever a platform's grouped matmul leaves in rows past the groups
        y_sorted = jnp.where((flat_ids[order] < num_experts)[:, None], y_sorted, 0.0)
    y = y_sorted[jnp.argsort(order)].reshape(-1, top_k, shape[-1])
    out = jnp.einsum("mkd,mk->md", y, expert_weights.reshape(-1, top_k).astype(jnp.float32))
    return out.reshape(shape)
