"""MXFP4 (OCP microscaling, e2m1 values + e8m0 scales) on the host, in numpy.

Layout of the gpt-oss checkpoints (HF `*_blocks` / `*_scales`, OpenAI `original/` alike):

- `blocks` uint8 [..., G, 16]: G blocks of 32 e2m1 values along the contracted (input) dimension,
  two per byte, low nibble first: `v[2i] = FP4_VALUES[b[i] & 15]`, `v[2i+1] = FP4_VALUES[b[i] >> 4]`.
- `scales` uint8 [..., G]: one e8m0 exponent per block; a value is `FP4_VALUES[nibble] * 2**(scale - 127)`.

`dequantize` gives [..., G*32], i.e. [..., out, in] for a weight: the *un-transposed* layout.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
"""e2m1 value of each 4-bit code (bit 3 is the sign, so code 8 is -0.0)."""

BLOCK_SIZE = 32  # values per block
BLOCK_BYTES = 16  # bytes per block
E8M0_BIAS = 127
_ROWS_PER_CHUNK = 1 << 15  # blocks handled per numpy pass: ~1M values, a few MB of temporaries


@functools.lru_cache(maxsize=None)
def _byte_pair_table(dtype: np.dtype) -> np.ndarray:
    """[256 * 256] table indexed by `scale << 8 | byte`: the two values the byte decodes to under that
    scale, as one unsigned integer (low nibble's value first in memory), in `dtype`.

    Entries are the exact `FP4_VALUES * 2**(scale-127)` rounded once to `dtype`: finite results are
    exact (3 significant bits; bfloat16/float32 subnormals reach 2**-133 / 2**-149), too large ones
    become +-inf, and zeros stay signed zeros, never NaN (also for scale 255, e8m0's NaN code).
    """
    if dtype.itemsize not in (2, 4):
        raise ValueError(f"dequantize supports 2- or 4-byte float dtypes, not {dtype}")
    exponents = np.arange(256) - E8M0_BIAS
    exact = np.ldexp(FP4_VALUES.astype(np.float64)[None, :], exponents[:, None])  # [256 scales, 16]
    with np.errstate(over="ignore"):
        values = exact.astype(np.float32).astype(dtype)  # float64 -> float32 overflows to inf
    byte = np.arange(256)
    pairs = np.stack([values[:, byte & 15], values[:, byte >> 4]], axis=-1)  # [256, 256, 2]
    pair_uint = np.uint32 if dtype.itemsize == 2 else np.uint64
    return np.ascontiguousarray(pairs).view(pair_uint).reshape(256 * 256)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """Decode MXFP4: blocks uint8 [..., G, 16] and scales uint8 [..., G] -> values [..., G*32] in `dtype`.

    `dtype` is bfloat16 (default), float16 or float32. The result is bit-for-bit what transformers'
    `convert_moe_packed_tensors(blocks, scales, dtype=...)` computes (its `torch.ldexp` of the LUT
    value by `scale - 127`: exact, overflow to +-inf, signed zeros kept), but NOT in its layout: for
    expert weights blocks [E, out, G, 16], transformers returns `out.transpose(1, 2)`, the dense HF
    layout [E, in, out]; this function returns [E, out, in], so
    `convert_moe_packed_tensors(b, s) == dequantize(b, s).swapaxes(1, 2)`. (transformers always swaps
    axes 1 and 2, so it fails on 3-D blocks and swaps leading axes for 5-D ones.)

    Works in chunks of blocks: beyond the output, extra memory is a few MB (plus a copy of `blocks`
    if it is not C-contiguous). One table lookup per output pair, indexed by `scale << 8 | byte`.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    for name, array in (("blocks", blocks), ("scales", scales)):
        if array.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8, got {array.dtype} (blocks {blocks.dtype}, scales {scales.dtype})")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK_BYTES:
        raise ValueError(f"blocks must be [..., G, {BLOCK_BYTES}] ({BLOCK_BYTES} bytes per block), "
                         f"got shape {blocks.shape}")
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"scales must be [..., G] = {blocks.shape[:-1]} for blocks of shape {blocks.shape}, "
                         f"got shape {scales.shape}")
    dtype = np.dtype(dtype)
    table = _byte_pair_table(dtype)

    out = np.empty((*blocks.shape[:-2], blocks.shape[-2] * BLOCK_SIZE), dtype=dtype)
    block_rows = blocks.reshape(-1, BLOCK_BYTES)  # [rows, 16]
    scale_rows = scales.reshape(-1)  # [rows]
    out_pairs = out.reshape(-1, BLOCK_SIZE).view(table.dtype)  # [rows, 16]: one integer per byte
    index = np.empty((min(_ROWS_PER_CHUNK, len(scale_rows)), BLOCK_BYTES), dtype=np.uint16)
    for start in range(0, len(scale_rows), _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, len(scale_rows))
        chunk_index = index[: stop - start]
        scale_high_byte = scale_rows[start:stop].astype(np.uint16) << 8
        np.bitwise_or(block_rows[start:stop], scale_high_byte[:, None], out=chunk_index)
        np.take(table, chunk_index, out=out_pairs[start:stop], mode="clip")  # indices are < 2**16
    return out


def quantize(values: np.ndarray, ties: str = "even") -> tuple[np.ndarray, np.ndarray]:
    """Encode MXFP4: values [..., N] (N % 32 == 0; float32, bfloat16 or float16; finite) ->
    (blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]).

    Scale, as transformers' export (`quantize_to_mxfp4` -> triton_kernels' `downcast_to_mxfp_torch`,
    default ROUND_UP): the smallest power of two >= amax/6, with amax/6 computed in float32, i.e.
    `scale = 127 + ceil(log2(amax / 6))`, at least 1; an all-zero block gets scale 0. Every value
    then lies within [-6, 6] after division by 2**(scale-127) and is rounded to the e2m1 grid,
    ties to the even code (`ties="even"`, as the OCP spec's and ml_dtypes' e2m1 casts do) or away from
    zero (`ties="away"`, as triton_kernels' bit trick does). The sign bit is always kept, so -0.0 and
    negatives that round to zero get code 8 (-0), as in triton_kernels. transformers casts weights to
    bfloat16 first: `quantize(w.astype(bfloat16), ties="away")` reproduces its bytes. (The OCP spec's
    example rule, scale 2**(floor(log2 amax) - 2), can clip a block's largest values to 6; not used.)

    Round trip: for scales in [1, 252] (no overflow, no subnormal loss), `dequantize` of the result
    reproduces `dequantize(blocks, scales)` bit for bit, -0 included; the bytes themselves come back
    exactly for every block whose largest |value| is 4 or 6 (codes 6, 7, 14, 15). A block whose
    largest |value| is 3 or less is re-encoded with a smaller scale, down to 1 (e.g. max 3 at scale s
    becomes max 6 at s-1): same values, other bytes. An all-zero block always gets scale 0.
    """
    if ties not in ("even", "away"):
        raise ValueError(f"ties must be 'even' or 'away', got {ties!r}")
    values = np.asarray(values)
    if values.ndim < 1 or values.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"last dimension must be a multiple of {BLOCK_SIZE}, got shape {values.shape}")
    num_blocks = values.shape[-1] // BLOCK_SIZE
    value_rows = values.reshape(-1, BLOCK_SIZE)  # [rows, 32]
    blocks = np.empty((len(value_rows), BLOCK_BYTES), dtype=np.uint8)
    scales = np.empty(len(value_rows), dtype=np.uint8)
    for start in range(0, len(value_rows), _ROWS_PER_CHUNK):
        stop = min(start + _ROWS_PER_CHUNK, len(value_rows))
        rows = value_rows[start:stop]
        result = _quantize_rows(rows, ties)
        if result is None:  # a non-finite value: name the first one
            flat = start * BLOCK_SIZE + int(np.flatnonzero(~np.isfinite(rows))[0])
            index = tuple(int(i) for i in np.unravel_index(flat, values.shape))
            raise ValueError(f"quantize needs finite values, got {values[index]} at index {index} of values "
                             f"with shape {values.shape}")
        blocks[start:stop], scales[start:stop] = result
    return (
        blocks.reshape(*values.shape[:-1], num_blocks, BLOCK_BYTES),
        scales.reshape(*values.shape[:-1], num_blocks),
    )


def _quantize_rows(rows: np.ndarray, ties: str) -> tuple[np.ndarray, np.ndarray] | None:
    """rows [n, 32] -> (blocks uint8 [n, 16], scales uint8 [n]), None if a value is not finite; see `quantize`."""
    x = rows.astype(np.float32)
    magnitude = np.abs(x)
    amax = magnitude.view(np.uint32).max(axis=1).view(np.float32)  # same order as floats, faster
    if not np.isfinite(amax).all():  # (NaN's bits are above inf's)
        return None
    # Round amax/6 up to a power of two on its float32 bits; the exponent field is the e8m0 scale
    # (finite amax/6 < 2**126, so the scale is at most 253).
    ratio_bits = (amax / np.float32(6.0)).view(np.uint32)
    scale = ((ratio_bits + np.uint32(0x007FFFFF)) >> np.uint32(23)).astype(np.uint8)
    # y = |x| / 2**(scale - 127) in [0, 6], multiplying by 2**(127 - scale) built from its bits (exact;
    # scale 0 only for all-zero blocks).
    inverse_scale = ((np.uint32(254) - scale.astype(np.uint32)) << np.uint32(23)).view(np.float32)
    y = magnitude * inverse_scale[:, None]
    # e2m1 binades: codes 0-4 step 0.5 on [0, 2), codes 4-6 step 1 on [2, 4), codes 6-7 step 2 on [4, 6].
    # binade = 0, 1, 2 from y's float32 exponent (128 for [2, 4), 129 for [4, 8)); then
    # code = round(y / (0.5 * 2**binade)) + 2 * binade, the division being exact.
    binade = np.clip((y.view(np.uint32) >> np.uint32(23)).astype(np.int32), 127, 129) - 127
    step_inverse = ((np.int32(128) - binade) << 23).view(np.float32)  # 2 / 2**binade
    steps = y * step_inverse
    if ties == "even":
        rounded = np.rint(steps)  # ties to even steps, which are the even codes
    else:
        whole = np.floor(steps)
        rounded = whole + (steps - whole >= 0.5)
    codes = np.minimum(rounded.astype(np.uint8) + (binade.astype(np.uint8) << 1), 7)
    codes |= np.signbit(x).view(np.uint8) << 3  # [n, 32]
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale


# ---------------------------------------------------------------------------------------------
# The in-memory layout (see `gptoss_jax.ops.mxfp4`): blocks [..., out, 16, in/32]

def from_released_layout(blocks: np.ndarray) -> np.ndarray:
    """Released blocks [..., out, in/32, 16] -> in-memory blocks [..., out, 16, in/32]."""
    return np.ascontiguousarray(np.swapaxes(blocks, -1, -2))


def to_released_layout(blocks: np.ndarray) -> np.ndarray:
    """In-memory blocks [..., out, 16, in/32] -> released blocks [..., out, in/32, 16]."""
    return np.ascontiguousarray(np.swapaxes(blocks, -1, -2))
