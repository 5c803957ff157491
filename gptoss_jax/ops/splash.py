"""TPU self-attention with a learned sink on jax's Pallas splash kernel (the TPU backend of `attend`).

Dimension letters as in `gptoss_jax.ops.attention`: b batch, t positions, n query heads, k KV heads,
h head dim. The kernel runs per example (vmapped over b) on head-major [heads, t, h] operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128  # the kernel's key blocks must be multiples of 128 lanes
MAX_BLOCK = 512


def _block(t: int) -> int:
    """The largest of 512, 256, 128 dividing t (t a multiple of 128)."""
    return next(size for size in (MAX_BLOCK, 256, LANES) if t % size == 0)


def _kernel(t: int, heads: int, window: int | None, interpret: bool) -> splash.SplashAttentionKernel:
    """A splash kernel for `heads` query heads over t positions, causal or a window of `window` keys."""
    if window is None:
        mask = splash.CausalMask((t, t))
    else:  # key j visible to query i iff i - window < j <= i: exactly `window` keys (right side 0: causal)
        mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    size = _block(t)
    blocks = splash.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                               block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size,
                               block_kv_dq=size)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


@jax.custom_vjp
def _float32_cotangent(x: jax.Array) -> jax.Array:
    """Identity on float32 sinks whose cotangent is cast back to float32 (splash returns q's dtype)."""
    return x


_float32_cotangent.defvjp(lambda x: (x, None), lambda _, g: (g.astype(jnp.float32),))


def attend_splash(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, positions: jax.Array,
                  window: int | None, segments: jax.Array | None = None, *,
                  interpret: bool = False) -> jax.Array:
    """Causal self-attention with sinks: q [b,t,n,h], k, v [b,k,t,h], sinks [n], positions [b,t] -> [b,t,n,h].

    Equals `attend(q, k, v, sinks, positions, positions, window, segments, segments)` when valid
    positions advance by one along each row within each segment (training rows, default positions):
    the kernel masks by index. Negative positions are padding: they get a segment id no real token
    has, so no real query sees them, and their output rows are 0 (as the dense oracle gives).
    Differentiable in q, k, v and sinks (splash's own custom VJP). `interpret=True` runs on CPU.
    """
    b, t, n, h = q.shape
    padded = -(-t // LANES) * LANES
    if padded != t:
        q = jnp.pad(q, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - t), (0, 0))) for x in (k, v))
        positions = jnp.pad(positions, ((0, 0), (0, padded - t)), constant_values=-1)
        if segments is not None:
            segments = jnp.pad(segments, ((0, 0), (0, padded - t)))
    valid = positions >= 0
    if segments is None:
        segments = jnp.where(valid, 0, -1).astype(jnp.int32)
    else:
        segments = segments.astype(jnp.int32)
        segments = jnp.where(valid, segments, jnp.min(segments) - 1)
    # GQA through the kernel itself: make_splash_mha accepts k heads < n heads (query head i reads KV
    # head i // (n // k), the same grouping as `attend`), so k and v are not repeated.
    kernel = _kernel(padded, n, window, interpret)
    scaled = (q.astype(jnp.float32) * h ** -0.5).astype(q.dtype)  # the kernel does not scale
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [b, t, heads, h] -> [b, heads, t, h]

    sinks32 = _float32_cotangent(sinks.astype(jnp.float32))

    def one(q1: jax.Array, k1: jax.Array, v1: jax.Array, seg1: jax.Array) -> jax.Array:
        return kernel(q1, k1, v1, splash.SegmentIds(seg1, seg1), sinks32)

    out = jax.vmap(one)(heads_major(scaled), k, v, segments)
    out = jnp.where(valid[:, :, None, None], jnp.swapaxes(out, 1, 2), 0)
    return out[:, :t].astype(q.dtype)
