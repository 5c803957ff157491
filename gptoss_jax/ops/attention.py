"""Attention math shared by the forward pass, prefill and decode: YaRN rotary embeddings and
softmax attention with a learned sink, masked by positions (causal, optional sliding window) and
optionally by segment ids (examples packed in one row).

`attend` is the one entry point; it picks the backend: `splash` (the Pallas kernel) for TPU
self-attention (on a mesh: per device, `parallel.per_shard`), else `blockwise` (pure JAX, memory linear in the context: CPU, GPU,
and TPU's fallback). `attend_dense` builds the whole score matrix: the tests' oracle, never used
by the model. The platform is `ops.platform.targets()`: the default backend's, or the one
`platform.lowering_for` names (exporting for TPU from a CPU host); splash is not even traced for
others: its mask tables take 84 s to build at 128k (measured on CPU, once per process and shape), which CPU and GPU runs never pay.

Dimension letters: b batch, t query positions, s key positions, n query heads, k KV heads,
g query heads per KV head, h head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import Config, yarn_inv_freq_and_scale
from gptoss_jax.ops import blockwise, parallel, platform, splash

lowering_for = platform.lowering_for
"""(`ops.platform.lowering_for`, kept under its first name.) Several platforms at once get
`blockwise` everywhere: a multi-platform lowering lowers every branch for every platform, and the
Pallas TPU call refuses the CPU."""


def rope_cos_sin(config: Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """YaRN cos and sin, float32 [b, t, h/2], already multiplied by YaRN's attention scale."""
    inv_freq, scale = yarn_inv_freq_and_scale(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(np.float32(inv_freq))
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half rotation (NeoX layout) of x [b, t, heads, h] by cos, sin [b, t, h/2]; float32 math."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


def visible(q_positions: jax.Array, k_positions: jax.Array, window: int | None,
            q_segments: jax.Array | None = None, k_segments: jax.Array | None = None) -> jax.Array:
    """Mask [b, t, s]: key j is visible to query i iff 0 <= pos_j <= pos_i (and pos_i - pos_j < window).

    With segment ids q_segments [b, t] and k_segments [b, s] (int32; several examples packed in one
    row, positions restarting at 0 in each), also only if seg_j == seg_i: no attention across examples.
    """
    if (q_segments is None) != (k_segments is None):
        raise ValueError("visible: give both q_segments and k_segments, or neither")
    q, k = q_positions[:, :, None], k_positions[:, None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= q - k < window
    if q_segments is not None:
        mask &= q_segments[:, :, None] == k_segments[:, None, :]
    return mask


CPU_SCORE_BLOCK_BYTES = 1 << 20
"""On CPU, the float32 bytes of one block of scores [heads, block_q, block_k] of a full layer, so
that a block's softmax passes run in cache. Measured (`blockwise.attend`, a 512-query chunk against
16k keys, one core; long-small's 64 heads of 16 / the bench config's 16 heads of 64): 512 x 512
blocks 14.3 / 10.2 ns per score, 128 x 128 5.7 / 5.9 ns, 32 x 128 4.1 / 5.9 ns."""


def _block_sizes(queries: int, heads: int, window: int | None) -> tuple[int, int]:
    """(block_q, block_k) for `blockwise.attend`: 128 x 128 on sliding layers (a query block then
    visits at most 2 key blocks); 512 x 512 for decode and on accelerators; on CPU, key blocks of
    128 and query blocks as large as `CPU_SCORE_BLOCK_BYTES` allows (16 to 512)."""
    if window is not None:
        return 128, 128
    if queries == 1 or not platform.only("cpu"):
        return 512, 512
    block_q = 512
    while block_q > 16 and heads * block_q * 128 * 4 > CPU_SCORE_BLOCK_BYTES:
        block_q //= 2
    return block_q, 128


def attend(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_positions: jax.Array,
           k_positions: jax.Array, window: int | None, q_segments: jax.Array | None = None,
           k_segments: jax.Array | None = None, *, in_order: bool = False,
           layer: jax.Array | None = None) -> jax.Array:
    """`attend_dense`'s result (same arguments and shapes) with memory linear in t and s.

    `in_order`: the keys are the queries, and valid positions advance by one along each row within
    each segment (forward without a cache, training rows; padding anywhere), so a kernel may mask
    by index: TPU then uses splash (on a mesh, per device on its shards). `layer`: k and v are a
    KV cache's every layer [layers, b, k, s, h] (possibly bfloat16 bits), read at `layer` in place."""
    def by_blocks() -> jax.Array:
        block_q, block_k = _block_sizes(q.shape[1], q.shape[2], window)
        return blockwise.attend(q, k, v, sinks, q_positions, k_positions, window, q_segments, k_segments,
                                block_q=block_q, block_k=block_k, layer=layer)

    if in_order and platform.targets() == ("tpu",):
        # on a mesh, per device on its shards: batch split as the activations, heads over tensor
        # when query and KV heads split alike (else whole heads on every tensor shard)
        heads = ("batch", "seq", "q_heads", "head_dim")
        kv = ("batch", "kv_heads", "seq", "head_dim")
        if q_segments is None:
            return parallel.per_shard(lambda q, k, v, s, p: splash.attend_splash(q, k, v, s, p, window),
                                      (q, k, v, sinks, q_positions), (heads, kv, kv, ("q_heads",), ("batch", "seq")),
                                      tied=((0, 2), (1, 1), (2, 1), (3, 0)))
        return parallel.per_shard(lambda q, k, v, s, p, g: splash.attend_splash(q, k, v, s, p, window, g),
                                  (q, k, v, sinks, q_positions, q_segments),
                                  (heads, kv, kv, ("q_heads",), ("batch", "seq"), ("batch", "seq")),
                                  tied=((0, 2), (1, 1), (2, 1), (3, 0)))
    return by_blocks()


def attend_dense(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_positions: jax.Array,
                 k_positions: jax.Array, window: int | None, q_segments: jax.Array | None = None,
                 k_segments: jax.Array | None = None) -> jax.Array:
    """Softmax attention with a per-head sink logit; scores and softmax in float32 (the test oracle).

    q [b, t, n, h]; k, v [b, k, s, h] (KV-head-major, as the cache); sinks [n]; q_positions [b, t];
    k_positions [b, s] (negative:
    an empty or padding slot); optional q_segments [b, t], k_segments [b, s] (see `visible`) ->
    [b, t, n, h]. The sink joins the softmax's denominator only:
    w_j = exp(s_j) / (sum_i exp(s_i) + exp(sink)), so a query may attend to nothing.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * h ** -0.5
    mask = visible(q_positions, k_positions, window, q_segments, k_segments)[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, kv_heads, n // kv_heads, 1, 1)
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    weights = jnp.exp(scores - top)
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sink - top))
    out = jnp.einsum("bkgts,bksh->btkgh", weights.astype(v.dtype), v)
    return out.reshape(b, t, n, h)
