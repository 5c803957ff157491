"""The MXFP4 matmul kernel: packed expert weights decoded a few rows at a time (pure JAX), or on
TPU a Pallas (Mosaic) kernel that decodes a block of output rows to bfloat16 in VMEM and feeds
the matrix unit (`matmul_pallas`; chosen when `ops.platform` traces for TPU alone).

In memory (and in a `--keep-mxfp4` Orbax checkpoint) an expert matrix is stored "out-major" as
in the released checkpoints, with the 16 bytes of a block moved before the block index:

    blocks uint8 [..., out, 16, in/32]   byte j of block k holds inputs 32k + 2j (low nibble)
                                         and 32k + 2j + 1 (high nibble)
    scales uint8 [..., out, in/32]       e8m0 exponent of block k

(`from_released_layout` / `to_released_layout` convert from / to the released [..., out, in/32, 16]).
With the block index minor, a scale broadcasts along a major axis and XLA:CPU vectorizes the
decode; measured here it decodes ~8x faster than with the released layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax import mxfp4
from gptoss_jax.ops import platform


def decode_fp4(codes):
    """e2m1 codes (any unsigned int array, values 0..15) -> float32 values, exactly `FP4_VALUES[codes]`.

    Magnitude codes 2..7 are normal numbers: placing the 3 bits under the exponent field of 2**-1
    gives 2**(e-1) * (1 + m/2); codes 0 and 1 (0 and 0.5) are fixed up from that with one select.
    (No denormals and no gather: XLA:CPU flushes denormals and runs gathers slowly.)"""
    magnitude = codes & 7
    v = jax.lax.bitcast_convert_type((magnitude.astype(jnp.uint32) << 22) + (126 << 23), jnp.float32)
    v = jnp.where(magnitude < 2, 2 * v - 1, v)
    return jnp.where(codes >= 8, -v, v)


def decode_scales(scales):
    """e8m0 exponents uint8 -> float32 2**(scale - 127) (scale 0, a denormal, flushes to 0 as XLA:CPU
    would anyway; 255 gives inf where the spec says NaN)."""
    return jax.lax.bitcast_convert_type(scales.astype(jnp.uint32) << 23, jnp.float32)


def dequantize_rows(blocks, scales):
    """In-memory blocks uint8 [r, 16, K] and scales [r, K] -> float32 [r, 32K], columns in the
    permuted input order of `permute_inputs` (first every low nibble, then every high one)."""
    scale = decode_scales(scales)[:, None, :]
    low = decode_fp4(blocks & 15) * scale
    high = decode_fp4(blocks >> 4) * scale
    return jnp.concatenate([low.reshape(blocks.shape[0], -1), high.reshape(blocks.shape[0], -1)], axis=1)


def permute_inputs(x):
    """x [..., 32K] (inputs in their natural order) -> the same values in `dequantize_rows`'s column
    order: index n*16K + j*K + k holds input 32k + 2j + n."""
    blocks = x.shape[-1] // mxfp4.BLOCK_SIZE
    x = x.reshape(*x.shape[:-1], blocks, mxfp4.BLOCK_BYTES, 2)
    return jnp.moveaxis(x, (-3, -2, -1), (-1, -2, -3)).reshape(*x.shape[:-3], -1)


CHUNK_BYTES = 512 << 10
"""Dequantized float32 bytes per step of `matmul`'s loop over output rows: L2-sized, so the decoded
rows are consumed from cache by the dot that follows."""


def chunk_rows(out: int, fan_in: int) -> int:
    """Output rows per dequantize-and-dot step: the largest power of two (>= 8) dividing `out` whose
    float32 rows fit `CHUNK_BYTES`, or `out` if none divides."""
    rows = 1 << max(3, (CHUNK_BYTES // (4 * fan_in)).bit_length() - 1)
    while rows >= 8 and out % rows:
        rows //= 2
    return rows if rows >= 8 and rows < out else out


def matmul(x, blocks, scales, index=()):
    """x @ W for an MXFP4 weight W [in, out], never materializing W: float32 [rows, out] (arguments
    as `matmul_jax`'s): on TPU (`ops.platform.targets() == ("tpu",)`) the Pallas kernel, with
    `matmul_jax`'s gradient in x; elsewhere `matmul_jax`."""
    if platform.targets() == ("tpu",):
        lead = blocks.ndim - 3
        idx = jnp.stack([jnp.asarray(i, jnp.int32) for i in index]) if lead else jnp.zeros((1,), jnp.int32)
        return _pallas_with_jax_gradient(x, blocks, scales, idx)
    return matmul_jax(x, blocks, scales, index)


def matmul_jax(x, blocks, scales, index=()):
    """x @ W for an MXFP4 weight W [in, out], never materializing W: float32 [rows, out].

    x [rows, in] (any float dtype); `blocks` uint8 [*lead, out, 16, in/32] and `scales` uint8
    [*lead, out, in/32] in the in-memory layout, of which `index` (len(lead) int scalars, e.g.
    (layer, expert)) picks one matrix, read in place. A loop over chunks of output rows decodes
    `chunk_rows` rows to float32 (exact) and multiplies them while they are in cache, so only one
    chunk of W is ever decoded at a time. (What `matmul_pallas` computes on TPU.)"""
    lead = blocks.ndim - 3
    assert len(index) == lead, (blocks.shape, index)
    out, _, groups = blocks.shape[lead:]
    rows = chunk_rows(out, groups * mxfp4.BLOCK_SIZE)
    x_permuted = permute_inputs(x.astype(jnp.float32))
    zero = jnp.zeros((), jnp.int32)
    start = tuple(jnp.asarray(i, jnp.int32) for i in index)

    def chunk(_, c):
        b = jax.lax.dynamic_slice(blocks, (*start, c * rows, zero, zero), (*(1,) * lead, rows, mxfp4.BLOCK_BYTES, groups))
        s = jax.lax.dynamic_slice(scales, (*start, c * rows, zero), (*(1,) * lead, rows, groups))
        w = dequantize_rows(b.reshape(rows, mxfp4.BLOCK_BYTES, groups), s.reshape(rows, groups))
        return None, jnp.einsum("mi,oi->mo", x_permuted, w, preferred_element_type=jnp.float32)

    _, y = jax.lax.scan(chunk, None, jnp.arange(out // rows, dtype=jnp.int32))  # [chunks, rows_x, rows]
    return jnp.moveaxis(y, 0, 1).reshape(x.shape[0], out)


def dense_matrix(blocks, scales, dtype=None):
    """In-memory MXFP4 blocks [..., out, 16, K] and scales [..., out, K] -> the dense expert layout
    [..., 32K (in), out] (float32, or `dtype`), exactly. For tests, export and the dequantize-at-load
    comparison; the model never builds this."""
    scale = decode_scales(scales)[..., None, :]
    pairs = jnp.stack([decode_fp4(blocks & 15) * scale, decode_fp4(blocks >> 4) * scale], axis=-1)  # [.., o, j, k, n]
    natural = jnp.swapaxes(pairs, -3, -2).reshape(*blocks.shape[:-2], -1)  # [.., o, k, j, n] -> [.., o, in]
    return jnp.swapaxes(natural, -1, -2).astype(dtype or jnp.float32)


INTERPRET = False
"""Run `matmul_pallas` in Pallas's interpret mode (tests of the TPU branch on CPU)."""


def _out_rows(out: int) -> int:
    """Output rows per kernel step: the largest of 256 ... 8 dividing `out` (5760 and 2880: 128 and 64)."""
    return next(rows for rows in (256, 128, 64, 32, 16, 8) if out % rows == 0)


def matmul_pallas(x, blocks, scales, idx, *, interpret: bool = False):
    """`matmul_jax(x, blocks, scales, tuple(idx))` as one Pallas TPU kernel: float32 [rows, out].

    idx int32 [len(lead)] (or [1], unused, for an unstacked matrix) picks the matrix, read in place
    by the kernel's block index (scalar prefetch). Grid over blocks of `_out_rows` output rows; each
    step decodes its [rows, 16, in/32] codes and scales to bfloat16 (exact: e2m1 values times a
    power of two) and multiplies them with x (bfloat16, permuted once to the decoded column order)
    on the matrix unit, float32 accumulation. Computes W^T x^T [out, rows] (output rows are the
    second-minor dimension, any multiple of 8), returned transposed."""
    lead = blocks.ndim - 3
    out, nbytes, groups = blocks.shape[lead:]
    rows = x.shape[0]
    step = _out_rows(out)
    xp = permute_inputs(x.astype(jnp.float32)).astype(jnp.bfloat16)  # column n*16K + j*K + k
    xp = jnp.moveaxis(xp.reshape(rows, 2, nbytes, groups), 0, 2)  # [2 (nibble), 16 (byte), rows, K]

    def kernel(idx_ref, x_ref, b_ref, s_ref, o_ref):
        del idx_ref  # (used by the index maps)
        scale = decode_scales(s_ref[...].reshape(step, groups))
        codes = jnp.swapaxes(b_ref[...].reshape(step, nbytes, groups).astype(jnp.int32), 0, 1)  # [16, step, K]
        acc = jnp.zeros((step, rows), jnp.float32)
        for j in range(nbytes):
            for n, nibble in enumerate((codes[j] & 15, codes[j] >> 4)):
                w = (decode_fp4(nibble) * scale).astype(jnp.bfloat16)  # [step, K]
                acc += jax.lax.dot_general(w, x_ref[n, j], (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        o_ref[...] = acc

    # inside a shard_map (checking varying axes) every operand varies over every axis any of them does
    vma = lambda a: jax.typeof(a).mat.varying
    varying = frozenset().union(*(vma(a) for a in (xp, blocks, scales, idx)))
    xp, blocks, scales, idx = (jax.lax.pcast(a, tuple(sorted(varying - vma(a))), to="varying")
                               if varying - vma(a) else a for a in (xp, blocks, scales, idx))
    at = lambda idx: tuple(idx[i] for i in range(lead))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(out // step,),
        in_specs=[pl.BlockSpec((2, nbytes, rows, groups), lambda o, idx: (0, 0, 0, 0)),
                  pl.BlockSpec((*(None,) * lead, step, nbytes, groups), lambda o, idx: (*at(idx), o, 0, 0)),
                  pl.BlockSpec((*(None,) * lead, step, groups), lambda o, idx: (*at(idx), o, 0))],
        out_specs=pl.BlockSpec((step, rows), lambda o, idx: (o, 0)))
    transposed = pl.pallas_call(kernel, grid_spec=grid_spec, interpret=interpret,
                                out_shape=jax.ShapeDtypeStruct((out, rows), jnp.float32,
                                                               manual_axis_type=jax.typeof(xp).mat))(idx, xp, blocks, scales)
    return transposed.T


@jax.custom_vjp
def _pallas_with_jax_gradient(x, blocks, scales, idx):
    return matmul_pallas(x, blocks, scales, idx, interpret=INTERPRET)


def _forward(x, blocks, scales, idx):
    return _pallas_with_jax_gradient(x, blocks, scales, idx), (x, blocks, scales, idx)


def _backward(residuals, cotangent):
    """The gradient in x through `matmul_jax` (linear in x; the codes and the index get none)."""
    x, blocks, scales, idx = residuals
    index = tuple(idx[i] for i in range(blocks.ndim - 3))
    _, vjp = jax.vjp(functools.partial(matmul_jax, blocks=blocks, scales=scales, index=index), x)
    return (*vjp(cotangent), None, None, None)


_pallas_with_jax_gradient.defvjp(_forward, _backward)
