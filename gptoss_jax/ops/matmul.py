"""Where weights are read and multiplied: projections, the unembedding, the grouped expert matmul.

Weights come as arrays (bfloat16 ones possibly as their bits, see `ops.bits`), quantized weights
(`gptoss_jax.quant`) or LoRA-adapted ones (`gptoss_jax.adapted.Adapted`); this module alone tells
them apart, so model code reads every format the same way. Platform choices, each with the
measurement behind it (the platform: `ops.platform`'s targets, so an export for TPU from a CPU host,
or a CPU test under `platform.lowering_for("tpu")`, takes the TPU branch):

- projections: XLA:CPU runs a bfloat16 product with a single row ~12x slower than one with two rows
  (0.26 against 3.2 Gparam/s on the unembedding), so there a single row is duplicated;
- the unembedding: XLA:CPU multiplies bfloat16 matrices by converting them to float32 first (for
  gpt-oss a 2.3 GB temporary per step), so on CPU it converts `UPCAST_CHUNK_BYTES` of rows at a time;
- the grouped expert matmul: `jax.lax.ragged_dot` on GPU and TPU; XLA:CPU lowers ragged_dot to a
  masked dense product ~30x slower, so on CPU a tiled scan computes only the rows in groups. Up to
  `NATIVE_MAX_ROWS_PER_GROUP` rows per expert (decode, prefill chunks) over plain float32 / bfloat16
  weights, CPU programs run here call `ops.native`'s kernel instead, since XLA:CPU copies each
  expert's slice before its dot (bench config, 8 layers' gate_up, ms tiled / native: float32 batch
  1 36.2 / 11.4, batch 16 209.6 / 125.8; bfloat16 24.8 / 9.5, 199.4 / 68.9); the tiles stay its
  gradient. MXFP4 experts on CPU run `ops.native`'s MXFP4 kernel the same way (codes decoded as
  they are read; elsewhere, and LoRA-adapted, the tiled scan decodes only the routed experts).

Dimension letters: m rows, g groups (experts), r LoRA rank.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax.adapted import Adapted
from gptoss_jax.ops import bits, native, parallel, platform
from gptoss_jax.quant import MXFP4Weight, is_quantized

Weight = Any
"""An array, a quantized weight, or an `Adapted` one."""


def dtype_of(w: Weight) -> Any:
    """The dtype a weight computes in (a bfloat16 weight passed as bits: bfloat16)."""
    base = w.base if isinstance(w, Adapted) else w
    return bits.value_dtype(base)


def merged(w: Weight) -> jax.Array:
    """The weight as one float32 array, a LoRA update folded in (small weights: the router)."""
    if isinstance(w, Adapted):
        return merged(w.base) + w.a @ w.b
    return bits.read(w).astype(jnp.float32)


def _einsum(spec: str, x: jax.Array, weight: jax.Array | bits.LayerView) -> jax.Array:
    """einsum(spec, x, weight) accumulated and returned in float32 (a plain array, or a view of one
    layer of a stack)."""
    kernel = bits.read(weight)  # (the native projection reads a view's stack in place instead)

    def plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32)

    x_spec, out_spec = spec.split(",")[0], spec.split("->")[1]
    rows = x.size // x.shape[-1] if x_spec.startswith("...") else \
        math.prod(n for n, letter in zip(x.shape, x_spec) if letter in out_spec)
    if x.dtype != jnp.bfloat16 or rows > NATIVE_MAX_PROJECTION_ROWS:
        return plain(x, kernel)

    def two_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return plain(jnp.concatenate([x, x]), kernel)[:1]

    def cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
        matrix = _as_matrix(spec, kernel)
        if matrix is not None and _native_projection_applies(matrix):
            return _native_projection(x, kernel, matrix, plain, weight)
        return two_rows(x, kernel) if rows == 1 else plain(x, kernel)

    return platform.select(x, kernel, cpu=cpu, default=plain)


NATIVE_MAX_PROJECTION_ROWS = 64
"""bfloat16 projections of at most this many rows run natively on CPU (`ops.native.grouped_matmul`
with one group): XLA:CPU converts a bfloat16 weight to float32 before its dot."""


def _as_matrix(spec: str, kernel: jax.Array) -> jax.Array | None:
    """The kernel as an [in, out] matrix (no copy) when `spec` contracts x's trailing letters with the
    kernel's leading ones and keeps the rest in order ("btd,dnh->btnh", "btnh,nhd->btd"); else None."""
    inputs, out_spec = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    contracted = "".join(c for c in w_spec if c not in out_spec)
    kept = w_spec[len(contracted):]
    if not (w_spec.startswith(contracted) and x_spec.endswith(contracted) and out_spec.endswith(kept)
            and out_spec == x_spec[: len(x_spec) - len(contracted)] + kept and "..." not in w_spec):
        return None
    inner = math.prod(kernel.shape[: len(contracted)])
    return kernel.reshape(inner, -1)


def _native_here() -> bool:
    """Whether a CPU branch being traced may call `ops.native`: a program run here (not one exported
    under `platform.lowering_for`), on one device or inside a shard_map (XLA would gather a sharded
    operand of a custom call whole), with the kernels built."""
    return not platform.overridden() and parallel.current() is None and native.available()


def _native_projection_applies(matrix: jax.Array) -> bool:
    return native.supports(matrix, (2,)) and _native_here()


def _native_projection(x: jax.Array, kernel: jax.Array, matrix: jax.Array, plain: Any,
                       weight: jax.Array | bits.LayerView) -> jax.Array:
    """plain(x, kernel) (an einsum `_as_matrix` took apart) as x [m, in] @ matrix [in, out], natively;
    a `LayerView` weight's whole stack is handed over with its index (read in place)."""
    shape = jax.eval_shape(plain, x, kernel).shape
    rows = x.size // matrix.shape[0]
    if isinstance(weight, bits.LayerView):
        stack, layer = weight.stacked.reshape(-1, 1, *matrix.shape), weight.index  # [layers, 1, in, out]
    else:
        stack, layer = matrix[None], None

    def reference(x2d: jax.Array, w: jax.Array, sizes: jax.Array, layer: Any) -> jax.Array:
        return jnp.dot(x2d, bits.read(w[0] if layer is None else bits.take(w, layer)[0]),
                       preferred_element_type=jnp.float32)

    y = native.grouped_matmul(x.reshape(rows, -1), stack, jnp.full((1,), rows, jnp.int32), layer,
                              reference=reference)
    return y.reshape(shape)


def _low_rank_specs(spec: str) -> tuple[str, str]:
    """"btd,dnh->btnh" -> ("btd,dr->btr", "btr,rnh->btnh"): the two products of (x @ a) @ b."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    rank = next(c for c in "rzyxwq" if c not in spec)
    contracted = "".join(c for c in w_spec if c not in out)
    w_out = "".join(c for c in w_spec if c in out)
    x_kept = "".join(c for c in x_spec if c not in contracted)
    return f"{x_spec},{contracted}{rank}->{x_kept}{rank}", f"{x_kept}{rank},{rank}{w_out}->{out}"


def _dropout(x: jax.Array, w: Adapted) -> jax.Array:
    """Inverted dropout of an adapter's input (x itself without dropout)."""
    if w.dropout_key is None:
        return x
    keep = jax.random.bernoulli(w.dropout_key, 1.0 - w.dropout_rate, x.shape)
    return jnp.where(keep, x.astype(jnp.float32) / (1.0 - w.dropout_rate), 0.0)


def project(spec: str, x: jax.Array, w: Weight, bias: jax.Array | None = None) -> jax.Array:
    """einsum(spec, x, w) (+ bias), accumulated and returned in float32; x's leading axis a batch axis.

    An `Adapted` w adds (dropout(x) @ a) @ b in float32."""
    if isinstance(w, Adapted):
        y = project(spec, x, w.base)
        spec_a, spec_b = _low_rank_specs(spec)
        low = jnp.einsum(spec_a, _dropout(x, w).astype(w.a.dtype), w.a, preferred_element_type=jnp.float32)
        y = y + jnp.einsum(spec_b, low, w.b, preferred_element_type=jnp.float32)
    else:
        y = _einsum(spec, x, w)
    return y if bias is None else y + bits.read(bias).astype(jnp.float32)


def embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows of table [v, d] for int tokens [...] -> [..., d] in the table's value dtype."""
    return bits.read(table, tokens)


UPCAST_CHUNK_BYTES = 64 << 20
"""float32 bytes of the unembedding converted at a time on CPU (see the module docstring)."""


def unembed(x: jax.Array, table: jax.Array, chunked: bool = True, valid: jax.Array | None = None) -> jax.Array:
    """x [..., d] @ table [v, d].T -> float32 [..., v]. `chunked=False` (on a mesh): one einsum.
    Rows where `valid` bool [...] is False (idle decode slots) may be skipped: their logits are
    unspecified."""
    x = x.astype(bits.value_dtype(table))
    v, d = table.shape

    def plain(x: jax.Array, table: jax.Array) -> jax.Array:
        return _einsum("...d,vd->...v", x, table)

    if not chunked:
        return plain(x, table)
    chunks = max((c for c in range(1, 257) if v % c == 0 and v // c * d * 4 >= UPCAST_CHUNK_BYTES), default=1)

    def by_chunks(x: jax.Array, table: jax.Array) -> jax.Array:
        rows = x.reshape(-1, d).astype(jnp.float32)

        def one_chunk(_: None, chunk: jax.Array) -> tuple[None, jax.Array]:
            return None, jnp.einsum("vd,md->mv", bits.read(chunk).astype(jnp.float32), rows)

        _, y = jax.lax.scan(one_chunk, None, table.reshape(chunks, v // chunks, d))  # [chunks, m, v / chunks]
        return jnp.moveaxis(y, 0, 1).reshape(*x.shape[:-1], v)

    def cpu(x: jax.Array, table: jax.Array) -> jax.Array:
        reference = plain if bits.value_dtype(table) == jnp.float32 or chunks == 1 else by_chunks
        if not _native_unembed_applies(x, table):
            return reference(x, table)
        mask = None if valid is None else valid.reshape(-1)
        rows = native.unembed(x.reshape(-1, d), table, reference=reference, valid=mask)  # [m, v]
        return rows.reshape(*x.shape[:-1], v)

    return platform.select(x, table, cpu=cpu, default=plain)


NATIVE_MAX_UNEMBED_ROWS = 24
"""The native unembedding takes at most this many rows (decode; prefill's last tokens). Bench config
(`benchmarks/bench_grouped_matmul.py`), ms native / XLA: float32 1 row 38.6 / 38.1, 8 rows 53.4 /
78.2, 16 rows 84.8 / 94.7, 32 rows 141.9 / 109.7; bfloat16 1 row 20.8 / 130.3, 16 rows 92.5 / 164.6.
From 16 to 24 rows the two are within this machine's noise in float32 when every row is valid
(16 / 20 / 24 rows: 77.8 / 74.9, 86.8 / 75.0, 109.0 / 113.5), and the native one skips idle slots
(20 rows, 12 valid: 69.4 / 102.2): the engine's prefill-with-decode call has slots + prefill rows."""


def _native_unembed_applies(x: jax.Array, table: jax.Array) -> bool:
    """Whether the CPU unembedding runs natively: a plain table, at most `NATIVE_MAX_UNEMBED_ROWS` rows."""
    return native.supports(table, (2,)) and x.size // x.shape[-1] <= NATIVE_MAX_UNEMBED_ROWS and _native_here()


# ---------------------------------------------------------------------------------------------
# The grouped expert matmul

def grouped_matmul(x: jax.Array, w: Weight, group_sizes: jax.Array, layer: jax.Array | None = None,
                   tile: int | None = None, activations: str = "float") -> jax.Array:
    """Rows of x [m, in] grouped consecutively (group_sizes [g]) times w [g, in, out] -> float32 [m, out],
    zero past the last group. The one grouped matmul of the experts, on one device and inside
    `gptoss_jax.sharding`'s shard_map.

    With `layer`, w holds every layer's matrices ([layers, g, in, out]) and `layer` picks one: a scan
    over layers then reads the weights in place, where a slice taken outside would be copied. w may
    be quantized (decoded per tile) or `Adapted` (per-group factors a [g, in, r], b [g, r, out] of this
    layer, the base stacked as above). `activations` "int8" lets the native MXFP4 kernel quantize x
    in decode (`Config.expert_activations`); every other path takes x as it is.
    """
    base = w.base if isinstance(w, Adapted) else w
    tiled = functools.partial(_tiled_grouped_matmul, tile=tile)  # (x, w, group_sizes, layer)
    if is_quantized(base):
        def quantized_cpu(x: jax.Array, w: Weight, group_sizes: jax.Array) -> jax.Array:
            if isinstance(w, MXFP4Weight) and _native_here():
                return native.mxfp4_grouped_matmul(x, w.blocks, w.scales, group_sizes, layer,
                                                   reference=_tiled_mxfp4, int8_activations=activations == "int8")
            return tiled(x, w, group_sizes, layer)

        return platform.select(x, w, group_sizes, cpu=quantized_cpu,
                               default=lambda x, w, group_sizes: tiled(x, w, group_sizes, layer))

    def cpu(x: jax.Array, w: Weight, group_sizes: jax.Array) -> jax.Array:
        if _native_applies(x, w, group_sizes):
            return native.grouped_matmul(x, w, group_sizes, layer, reference=tiled)
        return tiled(x, w, group_sizes, layer)

    return platform.select(x, w, group_sizes, cpu=cpu, default=functools.partial(_ragged_dot, layer=layer))


NATIVE_MAX_ROWS_PER_GROUP = 256
"""The native kernel takes a grouped matmul of at most this many rows per group on average (decode,
prefill chunks; padding rows count, though they skip the experts); more (long training rows) take
the tiles, differentiated anyway. Bench config gate_up, 32 experts, one layer, ms native / tiled
(`benchmarks/bench_grouped_matmul.py`), float32: 2 rows per group 13.3 / 33.6, 16: 24.0 / 52.0,
64: 69.0 / 102.1, 256: 263.5 / 322.1; bfloat16 on AMX tiles, ms: 64 rows 28-35, 256 rows 109-111.
The engine's prefill call of 4 x 256 prompt tokens with 16 decode slots is 4160 rows over 32
experts: 130 per group."""


def _tiled_mxfp4(x: jax.Array, blocks: jax.Array, scales: jax.Array, group_sizes: jax.Array,
                 layer: jax.Array | None) -> jax.Array:
    """The tiled grouped matmul of an MXFP4 weight given as its parts (`native.mxfp4_grouped_matmul`'s
    reference)."""
    return _tiled_grouped_matmul(x, MXFP4Weight(blocks, scales), group_sizes, layer=layer)


def _native_applies(x: jax.Array, w: Weight, group_sizes: jax.Array) -> bool:
    """Whether the CPU grouped matmul runs natively (`ops.native`): a plain float32 / bfloat16 weight,
    at most `NATIVE_MAX_ROWS_PER_GROUP` rows per group on average, `_native_here`."""
    return (native.supports(w) and x.shape[0] <= NATIVE_MAX_ROWS_PER_GROUP * group_sizes.shape[0]
            and _native_here())


def select_layer(w: Weight, layer: jax.Array) -> Weight:
    """The layer `layer` of a stacked expert matrix (of an `Adapted` one: its base; its factors are
    one layer's already, see `Adapted.at_layer`)."""
    if isinstance(w, Adapted):
        return w.with_base(select_layer(w.base, layer))
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, layer, keepdims=False), w)


def _ragged_dot(x: jax.Array, w: Weight, group_sizes: jax.Array, layer: jax.Array | None) -> jax.Array:
    if layer is not None:
        w = select_layer(w, layer)
    if isinstance(w, Adapted):
        y = jax.lax.ragged_dot(x, bits.read(w.base), group_sizes, preferred_element_type=jnp.float32)
        low = jax.lax.ragged_dot(x.astype(w.a.dtype), w.a, group_sizes, preferred_element_type=jnp.float32)
        return y + jax.lax.ragged_dot(low, w.b, group_sizes, preferred_element_type=jnp.float32)
    return jax.lax.ragged_dot(x, bits.read(w), group_sizes, preferred_element_type=jnp.float32)


def tile_rows(rows_per_group: int) -> int:
    """Power of two >= the rows a group gets on average, in [8, 128]."""
    return int(min(128, max(8, 1 << max(0, math.ceil(math.log2(max(1, rows_per_group)))))))


def _index_group(leaf: jax.Array, index: tuple[jax.Array, ...]) -> jax.Array:
    """leaf[index] for leading indices (layer, group) or (group,), read in place."""
    rest = leaf.shape[len(index):]
    start = (*index, *(jnp.zeros((), jnp.int32),) * len(rest))
    return jax.lax.dynamic_slice(leaf, start, (*(1,) * len(index), *rest),
                                 allow_negative_indices=False).reshape(rest)


def _group_product(x_tile: jax.Array, w: Weight, index: tuple[jax.Array, ...]) -> jax.Array:
    """x_tile [tile, in] @ w[index] -> float32 [tile, out]."""
    if isinstance(w, Adapted):  # factors: one layer's, indexed by group only
        a, b = _index_group(w.a, index[-1:]), _index_group(w.b, index[-1:])
        low = jnp.dot(x_tile.astype(a.dtype), a, preferred_element_type=jnp.float32)
        return _group_product(x_tile, w.base, index) + jnp.dot(low, b, preferred_element_type=jnp.float32)
    if is_quantized(w):
        return w.matmul(x_tile, index)
    return jnp.dot(x_tile, bits.read(_index_group(w, index)), preferred_element_type=jnp.float32)


def _out_columns(w: Weight) -> int:
    base = w.base if isinstance(w, Adapted) else w
    return base.shape[-1]


def _tiled_grouped_matmul(x: jax.Array, w: Weight, group_sizes: jax.Array, layer: jax.Array | None = None,
                          tile: int | None = None) -> jax.Array:
    """Grouped matmul that computes only the rows in groups.

    Each group's rows are padded to whole tiles, so a tile belongs to one group; a scan over the
    (static) worst-case tile count multiplies the used tiles by their group's weights and skips
    the rest. Differentiable (scan + cond), for fine-tuning.
    """
    rows, groups, columns = x.shape[0], group_sizes.shape[0], _out_columns(w)
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

    def typed_zeros(x_tile: jax.Array, index: tuple[jax.Array, ...]) -> jax.Array:
        # [tile, columns] of zeros that depend on every input like the product does (inside shard_map,
        # both branches of the cond must vary over the same mesh axes), with no matmul
        parts = [(w.base, index), (w.a, index[-1:]), (w.b, index[-1:])] if isinstance(w, Adapted) else [(w, index)]
        probes = [x_tile[:1, :1]] + [_index_group(leaf, at).reshape(-1)[:1]
                                     for part, at in parts for leaf in jax.tree.leaves(part)]
        return functools.reduce(lambda acc, f: acc * (0 * f).astype(jnp.float32).reshape(-1)[0], probes,
                                jnp.zeros((tile, columns), jnp.float32))

    def one_tile(_, inputs):
        t, x_tile, g = inputs
        index = (g,) if layer is None else (layer, g)
        y = jax.lax.cond(t < used, lambda: _group_product(x_tile, w, index), lambda: typed_zeros(x_tile, index))
        return None, y

    # Under differentiation (fine-tuning), recompute each tile's weight read in the backward pass
    # instead of saving every tile's [in, out] slice as a residual (a no-op for inference).
    one_tile = jax.checkpoint(one_tile, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    _, y_tiles = jax.lax.scan(one_tile, None, (jnp.arange(num_tiles), x_tiles.reshape(num_tiles, tile, -1),
                                               tile_group))
    y = y_tiles.reshape(num_tiles * tile, -1)[jnp.minimum(slot, num_tiles * tile - 1)]
    return jnp.where(valid[:, None], y, 0.0)
