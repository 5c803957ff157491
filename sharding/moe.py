"""Dropless expert parallelism: the experts inside `jax.shard_map` on a (data, fsdp, expert, tensor) mesh.

`gptoss_jax.moe.route` and `.experts` call `route` and `experts` here when one of our meshes is set
(`jax.set_mesh`). Routing runs per batch shard; each device then holds its batch shard's tokens,
expert ids and gate weights, and its shard of the expert weights: num_experts / expert whole
experts, each with intermediate / tensor of its columns.

Per device (dimension letters: m local tokens, M tokens of the expert group, k top-k, d hidden):
1. Exchange. Two ways, picked per call from the batch size:
   - "all_gather" (decode-sized batches): all-gather the group's tokens over `expert` (nothing to
     gather when the batch is too small to be split over `expert`: every shard already has it),
     keep the assignments to local experts, and after the experts reduce-scatter the outputs.
     Two dense collectives of static size, no routing-dependent sizes on the critical path, which
     is what a handful of tokens wants: there, latency is per collective, not per byte.
   - "ragged_all_to_all" (prefill / training batches): sort assignments by expert and send each
     expert shard exactly the rows routed to it with `jax.lax.ragged_all_to_all` (sizes exchanged
     first with one small all-gather), then send the results back. Each device sends and
     receives about m*k rows where the all-gather moves M = expert*m rows each way: k/expert of
     the bytes (1/2 for 120b on expert=8), and it sorts m*k assignments instead of M*k, which
     matters once batches are large.
   `auto` (the default) uses ragged_all_to_all when a device holds more than
   `ALL_GATHER_MAX_TOKENS` tokens and the platforms traced for (`ops.platform.targets()`: the
   default backend's, or `ops.platform.lowering_for`'s, e.g. an export for TPU from a CPU host)
   have a native ragged all-to-all (GPU, TPU). XLA:CPU has none; its stand-in
   (`_emulated_ragged_all_to_all`, a dense all_to_all of worst-case slots) moves expert*m*k rows,
   more than the all-gather, so for CPU `auto` all-gathers (both paths are tested there; the
   ragged one also under `lowering_for("tpu")`, which runs the stand-in on CPU).
2. Compute: sort the local assignments by local expert; gate_up, clamped SwiGLU, down with one
   grouped matmul each (`jax.lax.ragged_dot`; on CPU, where XLA lowers ragged_dot to a masked dense
   product over every group, `gptoss_jax.moe.expert_matmul`'s tiled scan instead). Only routed rows are computed: no
   capacity factor, no dropped tokens, no dense pass over all experts.
3. Combine: weight by the gates, sum the k experts, then one psum over `tensor` (each tensor shard
   held a slice of the intermediate dimension, so its down projection is a partial sum; the down
   bias is added on tensor shard 0 only), and the reduce over `expert` of step 1.

Buffers are sized for the worst case (every assignment of the group routed to one shard:
M * min(k, local experts) rows) so that no token is ever dropped; grouped matmuls skip the unused
rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptoss_jax import moe as moe_lib
from gptoss_jax.adapted import Adapted
from gptoss_jax.axes import EXPERT_AXES, LAYERS, LORA_AXES
from gptoss_jax.ops import collectives, matmul
from gptoss_jax.quant import is_quantized
from gptoss_jax.sharding import rules

STRATEGIES = ("auto", "all_gather", "ragged_all_to_all", "dense")
"""Exchange strategies. `dense` computes every local expert for every token (a baseline for
benchmarks and tests, never chosen by `auto`)."""

ALL_GATHER_MAX_TOKENS = 64
"""`auto` all-gathers when a device holds at most this many tokens (decode: batch per device)."""

_strategy = jax.make_user_context(default_value=None)
"""The strategy `moe_strategy` forces (None: auto); part of jit's cache key, like `ops.platform`'s targets."""


def moe_strategy(name: str) -> contextlib.AbstractContextManager:
    """Forces an exchange strategy for MoE layers traced inside the block (part of jit's cache key:
    a function jitted outside is traced again inside)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {name!r} (one of {', '.join(STRATEGIES)})")
    return _strategy(name)


def choose_strategy(tokens_per_device: int, tokens_split_over_expert: bool, native_ragged: bool,
                    requested: str = "auto") -> str:
    """The exchange for one MoE call (see the module docstring for why)."""
    if requested == "dense":
        return "dense"
    if not tokens_split_over_expert:
        return "all_gather"  # every expert shard already holds all of the group's tokens
    if requested != "auto":
        return requested
    if native_ragged and tokens_per_device > ALL_GATHER_MAX_TOKENS:
        return "ragged_all_to_all"
    return "all_gather"


def route(x: jax.Array, router: Any, router_bias: jax.Array, top_k: int, *, sizes: dict[str, int]
          ) -> tuple[jax.Array, jax.Array]:
    """`gptoss_jax.moe.route` per batch shard (x [b, ..., d] -> ids, weights [b, ..., k]) on a mesh of
    axis `sizes`.

    Left to the partitioner, top-k all-gathers the router logits of the whole batch on every
    device; in a shard_map each device routes its own tokens with the (replicated) router.
    """
    router = matmul.merged(router)  # float32 [d, e], a LoRA update folded in
    shape = x.shape
    x3 = x.reshape(shape[0], -1, shape[-1])
    token_spec = rules.activation_spec(("batch", None, None), x3.shape, sizes)
    router_spec = rules.weight_spec(("embed", "router_experts"), router.shape, sizes, what="router")
    bias_spec = rules.weight_spec(("router_experts",), router_bias.shape, sizes, what="router bias")

    def body(x, router, router_bias):
        if sizes["fsdp"] > 1:
            router = jax.lax.all_gather(router, "fsdp", axis=0, tiled=True)
        return moe_lib.route(x, router, router_bias, top_k)  # one-device code: the mesh is manual here

    ids, weights = jax.shard_map(body, in_specs=(token_spec, router_spec, bias_spec),
                                 out_specs=(token_spec, token_spec))(x3, router, router_bias)
    return ids.reshape(*shape[:-1], top_k), weights.reshape(*shape[:-1], top_k)


def experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: Any, gate_up_bias: jax.Array,
            down: Any, down_bias: jax.Array, *, sizes: dict[str, int], alpha: float, limit: float,
            layer: jax.Array | None = None) -> jax.Array:
    """Same contract as `gptoss_jax.moe.experts` (x [b, ..., d] -> float32 [b, ..., d]), sharded
    over a mesh of axis `sizes`. With `layer`, gate_up and down are every layer's [layers, e, ...]
    and `layer` picks one (read in place by the CPU grouped matmul, as on one device). The expert
    matrices may be quantized or LoRA-adapted: every part is split like its expert (the
    intermediate side over tensor) by its logical axes (`matrix_axes`)."""
    shape, d, top_k = x.shape, x.shape[-1], expert_ids.shape[-1]
    b = shape[0]
    x3 = x.reshape(b, -1, d)
    ids3 = expert_ids.reshape(b, -1, top_k)
    w3 = expert_weights.reshape(b, -1, top_k)

    token_spec = rules.activation_spec(("batch", None, None), x3.shape, sizes)
    batch_axes = _axes(token_spec[0])
    over_expert = "expert" in batch_axes
    tokens_per_device = x3.shape[0] * x3.shape[1] // math.prod(sizes[a] for a in batch_axes)
    strategy = choose_strategy(tokens_per_device, over_expert, collectives.has_native_ragged_all_to_all(),
                               _strategy.value or "auto")

    stacked = (LAYERS,) if layer is not None else ()
    if strategy == "dense" and any(is_quantized(w.base if isinstance(w, Adapted) else w) for w in (gate_up, down)):
        raise ValueError("the 'dense' MoE strategy (a benchmark baseline) needs dense expert weights, not quantized ones")
    specs = [matrix_specs(name, w, stacked, sizes) for name, w in (("gate_up", gate_up), ("down", down))]
    specs = [specs[0], rules.weight_spec(("experts", "expert_mlp"), gate_up_bias.shape, sizes, what="expert bias"),
             specs[1], rules.weight_spec(("experts", "embed"), down_bias.shape, sizes, what="expert bias")]
    body = functools.partial(_shard_body, sizes=sizes, strategy=strategy, token_axes=batch_axes,
                             alpha=alpha, limit=limit, stacked=bool(stacked))
    layer = jnp.zeros((), jnp.int32) if layer is None else layer  # (a scalar whatever `stacked`)
    out = jax.shard_map(body, in_specs=(token_spec, token_spec, token_spec, *specs, P()),
                        out_specs=token_spec)(x3, ids3, w3, gate_up, gate_up_bias, down, down_bias, layer)
    return out.reshape(shape)


def matrix_axes(name: str, weights: Any) -> Any:
    """Logical axes of expert matrix `name` ("gate_up" | "down"), a tree shaped like `weights` (a dense
    array, a quantized weight or an `Adapted` one)."""
    if isinstance(weights, Adapted):
        return Adapted(matrix_axes(name, weights.base), LORA_AXES[name]["a"], LORA_AXES[name]["b"])
    if is_quantized(weights):
        return type(weights).part_axes(EXPERT_AXES[name])
    return EXPERT_AXES[name]


def matrix_specs(name: str, weights: Any, stacked: tuple[str, ...], sizes: dict[str, int]) -> Any:
    """PartitionSpec(s) of the expert matrix `name` ("gate_up" | "down"), shaped like `weights`
    (`stacked`: the layer axis of the base; LoRA factors are one layer's)."""
    if isinstance(weights, Adapted):
        factor = {part: rules.weight_spec(LORA_AXES[name][part], getattr(weights, part).shape, sizes,
                                          what=f"expert LoRA {name}.{part}") for part in ("a", "b")}
        return Adapted(matrix_specs(name, weights.base, stacked, sizes), factor["a"], factor["b"])
    return jax.tree.map(lambda axes, w: rules.weight_spec((*stacked, *axes), w.shape, sizes, what=f"expert {name}"),
                        matrix_axes(name, weights), weights, is_leaf=lambda a: isinstance(a, tuple))


def _gather_embed(name: str, weights: Any) -> Any:
    """FSDP: all-gather this layer's local expert matrix along its `embed` axis (whole rows)."""
    return jax.tree.map(lambda axes, w: jax.lax.all_gather(w, "fsdp", axis=axes.index("embed"), tiled=True)
                        if "embed" in axes else w, matrix_axes(name, weights), weights,
                        is_leaf=lambda a: isinstance(a, tuple))


def _psum(x: jax.Array, axes: tuple[str, ...], sizes: dict[str, int]) -> jax.Array:
    axes = tuple(a for a in axes if sizes[a] > 1)
    return jax.lax.psum(x, axes) if axes else x


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _shard_body(x: jax.Array, ids: jax.Array, gates: jax.Array, gate_up: Any, gate_up_bias: jax.Array,
                down: Any, down_bias: jax.Array, layer: jax.Array, *, sizes: dict[str, int], strategy: str,
                token_axes: tuple[str, ...], alpha: float, limit: float, stacked: bool) -> jax.Array:
    """One device's MoE: x [b_local, t, d] -> float32 [b_local, t, d], already reduced. `stacked`:
    the expert matrices hold every layer's ([layers, e, ...]) and `layer` picks one."""
    shape, d, top_k = x.shape, x.shape[-1], ids.shape[-1]
    tokens, ids, gates = x.reshape(-1, d), ids.reshape(-1, top_k), gates.reshape(-1, top_k)
    if stacked and (sizes["fsdp"] > 1 or strategy == "dense"):  # this layer's experts only
        gate_up, down = (matmul.select_layer(m, layer) for m in (gate_up, down))
        stacked = False
    if sizes["fsdp"] > 1:  # FSDP: whole rows of the local experts for this layer
        gate_up, down = _gather_embed("gate_up", gate_up), _gather_embed("down", down)
        down_bias = jax.lax.all_gather(down_bias, "fsdp", axis=1, tiled=True)
    local_experts = gate_up_bias.shape[0]
    # (axes of size 1 are left out of specs and collectives, so that nothing varies over them)
    first_expert = jax.lax.axis_index("expert") * local_experts if sizes["expert"] > 1 else 0
    if sizes["tensor"] > 1:  # the down projection is a partial sum over tensor shards: add its bias once
        down_bias = down_bias * (jax.lax.axis_index("tensor") == 0).astype(down_bias.dtype)
    over_expert = "expert" in token_axes
    # rows an expert gets on average: the CPU grouped matmul's tile (the buffers are sized for the worst case)
    group_tokens = tokens.shape[0] * (sizes["expert"] if over_expert else 1)
    tile = matmul.tile_rows(group_tokens * top_k // (local_experts * sizes["expert"]))
    ffn = functools.partial(moe_lib.expert_ffn, gate_up=gate_up, gate_up_bias=gate_up_bias, down=down,
                            down_bias=down_bias, layer=layer if stacked else None, tile=tile,
                            alpha=alpha, limit=limit)

    if strategy == "ragged_all_to_all":
        varying = (*token_axes, *(("tensor",) if sizes["tensor"] > 1 else ()))  # what the buffers vary over
        out = _ragged_all_to_all_experts(tokens, ids, gates, ffn, local_experts, sizes["expert"], varying)
        out = _psum(out, ("tensor",), sizes)
    else:
        if over_expert:
            tokens, ids, gates = (jax.lax.all_gather(a, "expert", tiled=True) for a in (tokens, ids, gates))
        local = _dense_local_experts if strategy == "dense" else _sorted_local_experts
        out = local(tokens, ids, gates, ffn, first_expert, local_experts, gate_up, gate_up_bias, down,
                    down_bias, alpha, limit)
        if over_expert:
            out = _psum(jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True), ("tensor",), sizes)
        else:
            out = _psum(out, ("expert", "tensor"), sizes)
    return out.reshape(shape)


def _sorted_local_experts(tokens, ids, gates, ffn, first_expert, local_experts, *_):
    """All tokens of the group; compute only their assignments to this shard's experts."""
    m, top_k = ids.shape
    local = ids.reshape(-1) - first_expert
    mine = (local >= 0) & (local < local_experts)
    key = jnp.where(mine, local, local_experts)  # other shards' assignments sort last
    rows = m * min(top_k, local_experts)  # worst case: every token routed here k times
    order = jnp.argsort(key, stable=True)[:rows]
    group_sizes = jnp.bincount(key, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    sorted_key = key[order]
    y = ffn(tokens[order // top_k], sorted_key, group_sizes)
    weight = jnp.where(sorted_key < local_experts, gates.reshape(-1)[order].astype(jnp.float32), 0.0)
    return jnp.zeros((m, tokens.shape[-1]), jnp.float32).at[order // top_k].add(y * weight[:, None])


def _dense_local_experts(tokens, ids, gates, ffn, first_expert, local_experts, gate_up, gate_up_bias,
                         down, down_bias, alpha, limit):
    """Baseline: every local expert on every token of the group, weighted by its gate (0 if unrouted)."""
    del ffn
    every = jnp.broadcast_to(tokens, (local_experts, *tokens.shape))  # a batched matmul: XLA:CPU's best form
    hidden = matmul.project("emi,eio->emo", every, gate_up)
    hidden = hidden + gate_up_bias[:, None].astype(jnp.float32)
    activated = moe_lib.swiglu(hidden, alpha, limit).astype(tokens.dtype)
    y = matmul.project("emi,eio->emo", activated, down)
    y = y + down_bias[:, None].astype(jnp.float32)
    which = ids[:, :, None] == first_expert + jnp.arange(local_experts)  # [m, k, e]
    weight = jnp.einsum("mke,mk->me", which.astype(jnp.float32), gates.astype(jnp.float32))
    return jnp.einsum("emd,me->md", y, weight)


def _exclusive_cumsum(a: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def _ragged_all_to_all_experts(tokens, ids, gates, ffn, local_experts: int, shards: int,
                               varying: tuple[str, ...]) -> jax.Array:
    """Send each assignment to the shard owning its expert, compute, send the result back."""

    def buffer(rows: int, dtype: Any) -> jax.Array:  # typed as varying like the rows it receives
        return jax.lax.pcast(jnp.zeros((rows, d), dtype), varying, to="varying")

    m, top_k = ids.shape
    d = tokens.shape[-1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by global expert: by destination, then local expert
    x_send = tokens[order // top_k]
    counts = jnp.bincount(flat, length=local_experts * shards).astype(jnp.int32)
    all_counts = jax.lax.all_gather(counts, "expert")  # [source shard, global expert]
    sizes = all_counts.reshape(shards, shards, local_experts).sum(-1)  # [source, destination]
    me = jax.lax.axis_index("expert")
    send_sizes, recv_sizes = sizes[me], sizes[:, me]
    send_offsets = _exclusive_cumsum(send_sizes)  # where each destination's rows start in x_send
    land_offsets = _exclusive_cumsum(sizes, axis=0)  # [source, destination]: start in destination's buffer
    capacity = shards * m * min(top_k, local_experts)  # worst case: every shard sends everything here
    x_recv = collectives.ragged_all_to_all(x_send, buffer(capacity, x_send.dtype), send_offsets, send_sizes,
                               land_offsets[me], recv_sizes, axis_name="expert", axis_size=shards)

    # received rows: chunks by source shard, each sorted by local expert
    recv_counts = jax.lax.dynamic_slice_in_dim(all_counts, me * local_experts, local_experts, axis=1)
    segment_ends = jnp.cumsum(recv_counts.reshape(-1))
    segment = jnp.searchsorted(segment_ends, jnp.arange(capacity), side="right")
    key = jnp.where(segment < shards * local_experts, segment % local_experts, local_experts)
    order2 = jnp.argsort(key, stable=True)
    y2 = ffn(x_recv[order2], key[order2], recv_counts.sum(0))
    y_recv = jnp.zeros_like(y2).at[order2].set(y2)

    back_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]  # where my rows started in each source's x_send
    y_sorted = collectives.ragged_all_to_all(y_recv, buffer(m * top_k, jnp.float32), land_offsets[:, me],
                                 recv_sizes, back_offsets, send_sizes, axis_name="expert", axis_size=shards)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(m, top_k, d)
    return jnp.einsum("mkd,mk->md", y, gates.astype(jnp.float32))
