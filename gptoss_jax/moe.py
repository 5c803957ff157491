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
    """
    logits = jnp.einsum("...d,de->...e", x, router, preferred_element_type=jnp.float32)
    logits = logits + router_bias.astype(jnp.float32)
    top_logits, expert_ids = jax.lax.top_k(logits, top_k)
    return expert_ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)


def expert_matmul(x_sorted: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The one grouped matmul of the experts: rows of x_sorted [a, in] belong to consecutive experts
    (group_sizes [e] rows each); weights [e, in, out] -> float32 [a, out]."""
    return jax.lax.ragged_dot(x_sorted, weights, group_sizes, preferred_element_type=jnp.float32)


def swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's clamped SwiGLU on interleaved columns: gate = [..., 0::2], up = [..., 1::2].

    gate_up [..., 2i] -> [..., i], float32: min(gate, limit) * sigmoid(alpha * gate) * (clip(up) + 1).
    """
    gate = jnp.minimum(gate_up[..., 0::2], limit)
    up = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1)


def experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: jax.Array,
            gate_up_bias: jax.Array, down: jax.Array, down_bias: jax.Array, *, alpha: float,
            limit: float) -> jax.Array:
    """Weighted sum of each token's routed experts.

    x [..., d]; expert_ids, expert_weights [..., k]; gate_up [e, d, 2i]; gate_up_bias [e, 2i];
    down [e, i, d]; down_bias [e, d] -> float32 [..., d].
    """
    shape, top_k, num_experts = x.shape, expert_ids.shape[-1], gate_up.shape[0]
    tokens = x.reshape(-1, shape[-1])
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # assignments sorted by expert
    sorted_ids = flat_ids[order]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    x_sorted = tokens[order // top_k]
    hidden = expert_matmul(x_sorted, gate_up, group_sizes) + gate_up_bias[sorted_ids].astype(jnp.float32)
    activated = swiglu(hidden, alpha, limit).astype(x.dtype)
    y_sorted = expert_matmul(activated, down, group_sizes) + down_bias[sorted_ids].astype(jnp.float32)

    unsort = jnp.argsort(order)
    y = y_sorted[unsort].reshape(-1, top_k, shape[-1])
    out = jnp.einsum("mkd,mk->md", y, expert_weights.reshape(-1, top_k).astype(jnp.float32))
    return out.reshape(shape)
