"""Blockwise attention in pure JAX: an online softmax over key blocks with the sink folded in, and a
custom VJP that recomputes the blocks (FlashAttention-2), so memory is linear in the context.

Each query block visits only the key blocks that hold a key some of its queries can see (decided
from positions and segment ids, per row): a sliding layer visits the blocks inside its window, a
full layer the filled blocks up to its queries, a decode step only its row's filled blocks. Key
slots may be in any position order (a ring buffer's are not sorted); the exact mask is applied
inside each visited block.

Keys and values are KV-head-major, [b, k, s, h] (as the KV cache stores them): a block of keys is
then a contiguous [k, s, h] slab that the score and value products read as they are (token-major
[b, s, k, h] made XLA:CPU transpose every block: a decode step at 32k, one full layer of the bench
config, 16 ms -> 8.4 ms; see `cache.py`).

Dimension letters: t queries of a block, s keys of a block, k KV heads, g query heads per KV head,
h head dim; `nq` / `nk` numbers of query / key blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptoss_jax.ops import bits

_FAR = jnp.iinfo(jnp.int32).max // 2
"""Stands for +infinity among positions and segment ids (min of an empty block)."""


def block_size(length: int, largest: int) -> int:
    """The block size for `length` positions: the largest power of two <= `largest` that divides
    `length` (no padding copy of a bucketed cache), or `largest` when only small ones would."""
    size = largest
    while size > 16 and length % size:
        size //= 2
    return size if length % size == 0 else min(largest, length)


def _pad_to(x: jax.Array, axis: int, multiple: int, value: int | float) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _ranges(values: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per block [..., blocks, size] -> (min, max) over valid entries [..., blocks]; (FAR, -FAR) if none."""
    return (jnp.min(jnp.where(valid, values, _FAR), axis=-1), jnp.max(jnp.where(valid, values, -_FAR), axis=-1))


def _plan(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None, k_seg: jax.Array | None,
          window: int | None) -> tuple[jax.Array, jax.Array]:
    """Which key blocks each query block visits. q_pos, q_seg [b, nq, t]; k_pos, k_seg [b, nk, s] ->
    (order [b, nq, nk]: the blocks to visit first, in key order; count [b, nq]: how many)."""
    q_lo, q_hi = _ranges(q_pos, q_pos >= 0)
    k_lo, k_hi = _ranges(k_pos, k_pos >= 0)
    needed = k_lo[:, None, :] <= q_hi[:, :, None]  # false for empty blocks (FAR > -FAR)
    if window is not None:
        needed &= k_hi[:, None, :] > q_lo[:, :, None] - window
    if q_seg is not None:
        qs_lo, qs_hi = _ranges(q_seg, q_pos >= 0)
        ks_lo, ks_hi = _ranges(k_seg, k_pos >= 0)
        needed &= (ks_lo[:, None, :] <= qs_hi[:, :, None]) & (ks_hi[:, None, :] >= qs_lo[:, :, None])
    order = jnp.argsort(~needed, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.sum(needed, axis=-1, dtype=jnp.int32)


def _mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array, k_seg: jax.Array, window: int | None) -> jax.Array:
    """[t], [s] -> visible [t, s] (as `attention.visible`)."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if q_seg is not None:
        mask &= q_seg[:, None] == k_seg[None, :]
    return mask if window is None else mask & (q - k < window)


def _key_block(keys: tuple[jax.Array, ...], index: jax.Array, size: int, where: tuple = (),
               axis: int = 0) -> tuple[jax.Array, ...]:
    """Block `index` (along `axis`, after the leading indices) of each of `keys` [*where's axes, ...]
    at the leading indices `where` (e.g. (layer, row) of a whole KV cache, read in place); bfloat16
    bits are read as bfloat16 (`ops.bits`)."""
    def one(x: jax.Array) -> jax.Array:
        lead = len(where)
        at = lead + axis
        if x.shape[at] == size and not lead:  # one block (a ring buffer): no slice, nor a gather when batched
            return bits.read(x)
        starts = [0] * x.ndim
        starts[:lead], starts[at] = where, index * size
        sizes = list(x.shape)
        sizes[:lead], sizes[at] = (1,) * lead, size
        block = jax.lax.dynamic_slice(x, starts, sizes)
        return bits.read(block.reshape(block.shape[lead:]))
    return tuple(one(x) for x in keys)


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """q [t, k, g, h], k [k, s, h], mask [t, s] -> float32 [k, g, t, s] scaled by h**-0.5, -inf where hidden."""
    s = jnp.einsum("tkgh,ksh->kgts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jnp.where(mask, s, -jnp.inf)


def _forward_row(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, order, count, where, window, bk):
    """One row. q [nq, t, k, g, h]; k, v [k, S, h] (or a whole cache, read at `where`: see
    `_key_block`); sinks float32 [k, g]; q_pos, q_seg [nq, t]; k_pos, k_seg [S]; order [nq, nk];
    count [nq] -> (out [nq, t, k, g, h], lse float32 [nq, k, g, t])."""
    def query_block(args):
        qb, qp, qs, blocks, n = args
        kv_heads, groups, t = qb.shape[1], qb.shape[2], qb.shape[0]
        top = jnp.broadcast_to(sinks[:, :, None], (kv_heads, groups, t))  # the sink seeds the max ...
        total = jnp.ones_like(top)  # ... and its exp(sink - max) = 1 the denominator
        acc = jnp.zeros((kv_heads, groups, t, qb.shape[-1]), jnp.float32)

        def visit(i, carry):
            top, total, acc = carry
            kb, vb = _key_block((k, v), blocks[i], bk, where, axis=1)
            kp, = _key_block((k_pos,), blocks[i], bk)
            ks = None if k_seg is None else _key_block((k_seg,), blocks[i], bk)[0]
            kb, vb = kb.astype(qb.dtype), vb.astype(qb.dtype)  # a cache may be stored in another dtype
            s = _scores(qb, kb, _mask(qp, kp, qs, ks, window))
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_top[..., None])
            rescale = jnp.exp(top - new_top)
            total = total * rescale + jnp.sum(p, axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum("kgts,ksh->kgth", p.astype(vb.dtype), vb,
                                                        preferred_element_type=jnp.float32)
            return new_top, total, acc

        top, total, acc = jax.lax.fori_loop(0, n, visit, (top, total, acc))
        out = (acc / total[..., None]).transpose(2, 0, 1, 3)
        return out.astype(qb.dtype), top + jnp.log(total)

    return jax.lax.map(query_block, (q, q_pos, q_seg, order, count))


def _backward_row(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, order, count, out, lse, d_out, window, bk):
    """One row's (dq [nq, t, k, g, h], dk, dv float32 [k, S, h], dsinks float32 [k, g])."""
    delta = jnp.einsum("ntkgh,ntkgh->nkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_sinks = -jnp.sum(jnp.exp(sinks[None, :, :, None] - lse) * delta, axis=(0, 3))

    def query_block(carry, args):
        dk, dv = carry
        qb, qp, qs, blocks, n, lb, db, dob = args
        dob = dob.astype(jnp.float32)
        scale = qb.shape[-1] ** -0.5

        def visit(i, carry):
            dq, dk, dv = carry
            start = blocks[i] * bk
            (kb, vb), (kp,) = _key_block((k, v), blocks[i], bk, axis=1), _key_block((k_pos,), blocks[i], bk)
            ks = None if k_seg is None else _key_block((k_seg,), blocks[i], bk)[0]
            kb, vb = kb.astype(qb.dtype), vb.astype(qb.dtype)
            p = jnp.exp(_scores(qb, kb, _mask(qp, kp, qs, ks, window)) - lb[..., None])  # [k, g, t, s]
            dp = jnp.einsum("tkgh,ksh->kgts", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - db[..., None]) * scale
            dq = dq + jnp.einsum("kgts,ksh->tkgh", ds, kb, preferred_element_type=jnp.float32)
            dk_block = jnp.einsum("kgts,tkgh->ksh", ds, qb, preferred_element_type=jnp.float32)
            dv_block = jnp.einsum("kgts,tkgh->ksh", p, dob, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, bk, 1) + dk_block, start, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, bk, 1) + dv_block, start, 1)
            return dq, dk, dv

        dq, dk, dv = jax.lax.fori_loop(0, n, visit, (jnp.zeros(qb.shape, jnp.float32), dk, dv))
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), (q, q_pos, q_seg, order, count, lse, delta, d_out))
    return dq, dk, dv, d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _attend(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, window, bk):
    return _attend_fwd(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, window, bk)[0]


def _attend_fwd(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, window, bk, layer=None):
    nk = k_pos.shape[1] // bk
    order, count = _plan(q_pos, k_pos.reshape(k_pos.shape[0], nk, bk), q_seg,
                         None if k_seg is None else k_seg.reshape(k_seg.shape[0], nk, bk), window)
    row = functools.partial(_forward_row, window=window, bk=bk)
    if layer is None:  # k, v [b, k, S, h]: one row each
        kv_axis, where = 0, ()
    else:  # the whole cache [layers, b, k, S, h], not batched (vmap would move its batch axis: a copy)
        kv_axis, where = None, (layer, jnp.arange(q.shape[0]))
    out, lse = jax.vmap(row, in_axes=(0, kv_axis, kv_axis, None, 0, 0, 0, 0, 0, 0, (None, 0)[:len(where)]))(
        q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, order, count, where)
    return out, (q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, order, count, out, lse)


def _attend_bwd(window, bk, residuals, d_out):
    q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, order, count, out, lse = residuals
    row = functools.partial(_backward_row, window=window, bk=bk)
    dq, dk, dv, d_sinks = jax.vmap(row, in_axes=(0, 0, 0, None, 0, 0, 0, 0, 0, 0, 0, 0, 0))(
        q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, order, count, out, lse, d_out)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.sum(d_sinks, 0).astype(sinks.dtype),
            None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_positions: jax.Array,
           k_positions: jax.Array, window: int | None, q_segments: jax.Array | None = None,
           k_segments: jax.Array | None = None, *, block_q: int = 512, block_k: int = 512,
           layer: jax.Array | None = None) -> jax.Array:
    """`attention.attend_dense`'s result, blockwise: q [b, t, n, h]; k, v [b, k, s, h]; sinks [n];
    positions [b, t] / [b, s] (negative: padding or an empty slot); optional segments -> [b, t, n, h].

    Blocks of `block_q` queries visit blocks of `block_k` keys (smaller when the lengths are; see
    `block_size`); differentiable in q, k, v and sinks with memory linear in t and s. With `layer`
    (a KV cache), k and v are every layer's [layers, b, k, s, h], read at `layer` in place (no copy,
    no gradient); they may hold bfloat16 bits (`ops.bits`)."""
    if (q_segments is None) != (k_segments is None):
        raise ValueError("attend: give both q_segments and k_segments, or neither")
    b, t, n, h = q.shape
    kv_heads, s = k.shape[-3], k.shape[-2]
    bq, bk = block_size(t, block_q), block_size(s, block_k)
    if layer is not None and s % bk:
        bk = s  # one block rather than a padded copy of every layer's cache
    if layer is not None and bk == s:  # one block (a ring, a short cache): read this layer's whole, small
        k, v, layer = bits.read(k[layer]), bits.read(v[layer]), None
    q_pos, k_pos = _pad_to(q_positions.astype(jnp.int32), 1, bq, -1), _pad_to(k_positions.astype(jnp.int32), 1, bk, -1)
    q_seg = k_seg = None
    if q_segments is not None:
        q_seg, k_seg = _pad_to(q_segments.astype(jnp.int32), 1, bq, 0), _pad_to(k_segments.astype(jnp.int32), 1, bk, 0)
    nq = q_pos.shape[1] // bq
    blocks = _pad_to(q, 1, bq, 0).reshape(b, nq, bq, kv_heads, n // kv_heads, h)
    args = (blocks, k, v, sinks.astype(jnp.float32).reshape(kv_heads, n // kv_heads), q_pos.reshape(b, nq, bq),
            k_pos, None if q_seg is None else q_seg.reshape(b, nq, bq), k_seg)
    if layer is not None:
        out = _attend_fwd(*args, window, bk, layer)[0]
    else:
        k, v = _pad_to(k, 2, bk, 0), _pad_to(v, 2, bk, 0)
        out = _attend(*args[:1], k, v, *args[3:], window, bk)
    return out.reshape(b, nq * bq, n, h)[:, :t]
