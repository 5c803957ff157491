"""Blockwise attention against the dense oracle (`attention.attend_dense`), float32: outputs and the
gradients of q, k, v and sinks, for every way the model calls it (whole sequences with padding or
packed segments, prefill chunks at an offset into a cache, decode steps, sliding rings that wrapped
around, GQA), and the window's exact 128 keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.ops import attention, blockwise

TOLERANCE = 1e-5
"""Max |blockwise - dense| / max |dense|, per output and per gradient (measured: 1e-7 to 9e-7)."""


def _relative(ours: jax.Array, oracle: jax.Array) -> float:
    return float(jnp.max(jnp.abs(ours - oracle)) / jnp.maximum(jnp.max(jnp.abs(oracle)), 1e-30))


def _compare(q_positions, k_positions, window, *, heads=(8, 2), head_dim=16, segments=None, blocks=(32, 32),
             seed=0) -> None:
    """Random q, k, v, sinks for these positions; blockwise (small blocks: many of them) against dense."""
    q_positions, k_positions = jnp.asarray(q_positions, jnp.int32), jnp.asarray(k_positions, jnp.int32)
    (b, t), s = q_positions.shape, k_positions.shape[1]
    n, kv = heads
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, t, n, head_dim))
    k = jax.random.normal(keys[1], (b, kv, s, head_dim))  # KV-head-major, as the cache
    v = jax.random.normal(keys[2], (b, kv, s, head_dim))
    sinks = jax.random.normal(keys[3], (n,))
    # Padding queries' outputs are not used; their cotangent is zero, as the model's loss gives them.
    cotangent = jax.random.normal(keys[4], (b, t, n, head_dim)) * (q_positions >= 0)[..., None, None]
    q_seg, k_seg = (None, None) if segments is None else (jnp.asarray(segments[0]), jnp.asarray(segments[1]))

    def loss(fn):
        def value(q, k, v, sinks):
            out = fn(q, k, v, sinks, q_positions, k_positions, window, q_seg, k_seg)
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2, 3), has_aux=True))

    blocked = loss(lambda *a: blockwise.attend(*a, block_q=blocks[0], block_k=blocks[1]))
    (_, ours), ours_grads = blocked(q, k, v, sinks)
    (_, dense), dense_grads = loss(attention.attend_dense)(q, k, v, sinks)
    valid = (q_positions >= 0)[..., None, None]
    assert _relative(jnp.where(valid, ours, 0), jnp.where(valid, dense, 0)) < TOLERANCE
    for name, a, b in zip(("q", "k", "v", "sinks"), ours_grads, dense_grads):
        assert float(jnp.max(jnp.abs(b))) > 0, name
        assert _relative(a, b) < TOLERANCE, f"d{name}: {_relative(a, b):.2e}"


def _rows(t: int, b: int = 2) -> np.ndarray:
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()


@pytest.mark.parametrize("window", [None, 128])
def test_whole_sequence_with_padding(window):
    positions = _rows(300)
    positions[1, 230:] = -1  # right padding
    positions[0, :20] = -1  # left padding: positions then start later
    positions[0, 20:] = np.arange(280)
    _compare(positions, positions, window, blocks=(64, 32))


def test_packed_segments():
    segment = np.where(np.arange(300) < 170, 1, 2)[None].repeat(2, 0)
    positions = np.where(segment == 1, np.arange(300), np.arange(300) - 170).astype(np.int32)
    positions[1, 280:], segment[1, 280:] = -1, 0  # padding at the end of row 1
    _compare(positions, positions, 128, segments=(segment, segment))
    _compare(positions, positions, None, segments=(segment, segment), seed=1)


def test_prefill_chunk_at_an_offset_into_a_cache():
    """Queries 256..351 of row 0 (row 1: 100..195) against a 512-slot cache filled up to them."""
    offsets = np.array([[256], [100]])
    q_positions = offsets + np.arange(96)
    filled = (offsets + 96)[:, 0]
    k_positions = np.where(np.arange(512) < filled[:, None], np.arange(512), -1)
    _compare(q_positions, k_positions, None, heads=(64, 8), head_dim=8)


def test_decode_rows_read_up_to_their_own_length():
    """One query per row, at different lengths (a batch of a server's requests) against a 1024-slot cache."""
    q_positions = np.array([[700], [40], [0]])
    k_positions = np.where(np.arange(1024) <= q_positions, np.arange(1024), -1)
    _compare(q_positions, k_positions, None, heads=(16, 2), blocks=(1, 64))
    _compare(q_positions, k_positions, 128, heads=(16, 2), blocks=(1, 64), seed=1)


def test_sliding_ring_that_wrapped_around():
    """A 128-slot ring holding positions 172..299 (slot p % 128, out of position order), then a chunk
    of 64 new tokens appended (as the model's sliding layers attend in prefill); and a decode step."""
    ring = (np.arange(128) - 300) % 128 + 172
    chunk = np.arange(300, 364)
    k_positions = np.concatenate([ring, chunk])[None].repeat(2, 0)
    _compare(chunk[None].repeat(2, 0), k_positions, 128, blocks=(32, 64))
    ring_after = (np.arange(128) - 364) % 128 + 236  # the ring after the chunk and one decode token
    _compare(np.array([[363], [363]]), ring_after[None].repeat(2, 0), 128, blocks=(1, 32))


def test_a_sliding_query_sees_exactly_window_keys():
    """With q = 0 (all scores equal), v = 1 and sink 0, a query's output is n / (n + 1), n the keys it
    sees: 128 for every query past the first 128, position + 1 before. Dense at 127 and 129 differ."""
    t = 400
    positions = jnp.asarray(_rows(t, 1))
    q, k = jnp.zeros((1, t, 8, 16)), jax.random.normal(jax.random.key(0), (1, 2, t, 16))
    v, sinks = jnp.ones((1, 2, t, 16)), jnp.zeros((8,))
    out = jax.jit(lambda: attention.attend(q, k, v, sinks, positions, positions, 128))()
    seen = np.asarray(out[0, :, 0, 0] / (1 - out[0, :, 0, 0]))
    np.testing.assert_allclose(seen, np.minimum(np.arange(t) + 1, 128), rtol=1e-4)
    q = jax.random.normal(jax.random.key(1), (1, t, 8, 16))
    ours = attention.attend(q, k, k, sinks, positions, positions, 128)
    for other in (127, 129):
        assert _relative(ours, attention.attend_dense(q, k, k, sinks, positions, positions, other)) > 1e-3


def test_fully_hidden_queries_give_zero_not_nan():
    positions = np.full((1, 64), -1, np.int32)
    q = jax.random.normal(jax.random.key(0), (1, 64, 4, 8))
    kv = q[:, :, :2].swapaxes(1, 2)
    out = attention.attend(q, kv, kv, jnp.zeros(4), positions, positions, None)
    np.testing.assert_array_equal(np.asarray(out), 0)


def test_block_size_divides_bucketed_caches():
    assert blockwise.block_size(18432, 512) == 512 and blockwise.block_size(640, 512) == 128
    assert blockwise.block_size(1, 512) == 1 and blockwise.block_size(48, 512) == 16
