"""gpt-oss as Flax NNX modules, used functionally through `forward(config, params, tokens)`.

Each weight is declared once, here, with its shape, dtype and logical axis names (the `axes`
metadata of `nnx.Param`). Layers come in (sliding, full) pairs stacked along a leading `layers`
axis and run under one `jax.lax.scan`, so the compiled program holds one pair whatever the depth.

Dimension letters in einsums: b batch, t/s query/key positions, d hidden, n query heads,
k KV heads, g query heads per KV head, h head dim, e experts, v vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import attention, bits, cache, moe
from gptoss_jax.config import Config

Params = dict[str, Any]
"""A plain nested dict of arrays: the model's weights (see `params.py` for their paths)."""
KV = dict[str, jax.Array]
"""One layer's cached keys and values: {"k", "v"} [b, s, kv_heads, head_dim]."""
CacheView = tuple[jax.Array, jax.Array]
"""What a layer needs to know of its cache's slots: (slot positions [b, s], write slots [b, t])."""


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any,
            fan_in: int | None = None, std: float | None = None) -> nnx.Param:
    """Declares one weight: random normal init with std `std` or `fan_in ** -0.5`."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(_normal(rngs, shape, std if std is not None else fan_in ** -0.5, dtype), axes=axes)


def _constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding hint by logical axis names: a no-op unless a `gptoss_jax.sharding` mesh is
    set with `jax.set_mesh` (that package owns the map from logical names to mesh axes)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    from gptoss_jax.sharding import rules  # deferred: gptoss_jax.sharding imports this module

    return rules.constrain(x, axes)


def _einsum(spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """einsum(spec, x, kernel) accumulated and returned in float32, x's leading axis a batch axis.

    XLA:CPU runs a bfloat16 product with a single row ~12x slower than one with two rows (0.26
    against 3.2 Gparam/s on the unembedding), so there a single row is duplicated."""
    def plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32)

    x_spec, out_spec = spec.split(",")[0], spec.split("->")[1]
    rows = x.size // x.shape[-1] if x_spec.startswith("...") else \
        math.prod(n for n, letter in zip(x.shape, x_spec) if letter in out_spec)
    if rows != 1 or x.dtype != jnp.bfloat16:
        return plain(x, kernel)

    def two_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return plain(jnp.concatenate([x, x]), kernel)[:1]

    return jax.lax.platform_dependent(x, kernel, cpu=two_rows, default=plain)


UPCAST_CHUNK_BYTES = 64 << 20
"""float32 bytes of the unembedding converted at a time on CPU (see `_unembed`)."""


def _unembed(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [..., d] @ table [v, d].T -> float32 [..., v] (table may be `bits.as_bits`' bits).

    XLA:CPU multiplies bfloat16 matrices by converting them to float32 first: for gpt-oss's
    unembedding a 2.3 GB temporary per step. On CPU, with no mesh, a scan converts and multiplies
    `UPCAST_CHUNK_BYTES` of vocabulary rows at a time instead (its slices taken of the bits, see
    `gptoss_jax.bits`)."""
    v, d = table.shape
    chunks = max((c for c in range(1, 257) if v % c == 0 and v // c * d * 4 >= UPCAST_CHUNK_BYTES), default=1)
    if table.dtype == jnp.float32 or chunks == 1 or not jax.sharding.get_abstract_mesh().empty:
        return _einsum("...d,vd->...v", x, bits.read(table))

    def chunked(x: jax.Array, table: jax.Array) -> jax.Array:
        rows = x.reshape(-1, d).astype(jnp.float32)

        def one_chunk(_: None, chunk: jax.Array) -> tuple[None, jax.Array]:
            return None, jnp.einsum("vd,md->mv", bits.read(chunk).astype(jnp.float32), rows)

        _, y = jax.lax.scan(one_chunk, None, table.reshape(chunks, v // chunks, d))  # [chunks, m, v / chunks]
        return jnp.moveaxis(y, 0, 1).reshape(*x.shape[:-1], v)

    return jax.lax.platform_dependent(x, table, cpu=chunked,
                                      default=lambda x, t: _einsum("...d,vd->...v", x, bits.read(t)))


def _project(spec: str, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """einsum(spec, x, kernel) + bias, accumulated and returned in float32."""
    return _einsum(spec, x, kernel) + bias.astype(jnp.float32)


EXPERT_MATRICES = ("gate_up", "down")
"""The expert matrices (LoRA may adapt them per expert)."""
STACKED_IN_PLACE = (*EXPERT_MATRICES, "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales")
"""Weights that a scan over layers passes whole, with the layer index (see `moe.expert_matmul`)."""


Lora = dict[str, Any]
"""LoRA adapters (see `gptoss_jax.train.lora`): per adapted weight {"a", "b"} float32 with `a @ b` the
weight's full update (scale folded in); attention's may hold {"dropout": {"key", "rate"}}. Optional
everywhere: `lora=None` is the plain model."""


def _lora_delta(x: jax.Array, adapter: dict[str, jax.Array], spec_a: str, spec_b: str) -> jax.Array:
    """(x @ a) @ b in the adapters' dtype (float32), never forming a @ b."""
    low = jnp.einsum(spec_a, x.astype(adapter["a"].dtype), adapter["a"], preferred_element_type=jnp.float32)
    return jnp.einsum(spec_b, low, adapter["b"], preferred_element_type=jnp.float32)


def _lora_dropout(x: jax.Array, lora: Lora, index: int) -> jax.Array:
    """Inverted dropout of an adapter's input (one mask per adapted projection), or x as is."""
    if "dropout" not in lora:
        return x
    key, rate = lora["dropout"]["key"], lora["dropout"]["rate"]
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, x.shape)
    return jnp.where(keep, x.astype(jnp.float32) / (1.0 - rate), 0.0)


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _check_no_cache_with_segments(has_cache: bool, segments: jax.Array | None) -> None:
    """Segment ids (packed training rows) work only without a KV cache: a cache's slots carry no segment."""
    if has_cache and segments is not None:
        raise ValueError("segments (packed examples) are not supported with a KV cache: pass segments only to "
                         "a forward without a cache (training), or kv_cache only (generation)")


class RMSNorm(nnx.Module):
    """RMSNorm in float32 with a float32 scale (as transformers keeps it), output in the input dtype."""

    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.eps = config.rms_eps
        self.scale = nnx.Param(jnp.ones((config.hidden,), jnp.float32)
                               + _normal(rngs, (config.hidden,), 0.1, jnp.float32), axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> [..., d]."""
        t = x.astype(jnp.float32)
        t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * t).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with biases, YaRN rotary embeddings and a learned per-head sink."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs):
        d, n, k, h = config.hidden, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = _weight(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype, fan_in=d)
        self.q_bias = _weight(rngs, (n, h), ("q_heads", "head_dim"), dtype, std=0.02)
        self.k = _weight(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, fan_in=d)
        self.k_bias = _weight(rngs, (k, h), ("kv_heads", "head_dim"), dtype, std=0.02)
        self.v = _weight(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, fan_in=d)
        self.v_bias = _weight(rngs, (k, h), ("kv_heads", "head_dim"), dtype, std=0.02)
        self.o = _weight(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype, fan_in=n * h)
        self.o_bias = _weight(rngs, (d,), ("embed",), dtype, std=0.02)
        self.sinks = _weight(rngs, (n,), ("q_heads",), dtype, std=1.0)

    def __call__(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
                 window: int | None, kv: KV | None = None, view: CacheView | None = None,
                 lora: Lora | None = None, segments: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
        """x [b, t, d], positions [b, t] (negative: padding), rope (cos, sin) [b, t, h/2] -> [b, t, d].

        With a cache: `kv` holds this layer's cached {"k", "v"} [b, s, kv_heads, h] and `view` the
        slots' positions [b, s] and where the new tokens go [b, t]; the new tokens attend to the
        cached ones and to each other, and the updated `kv` is returned.
        `segments` int32 [b, t] (no cache only): packed examples' ids; a token attends only within its own.
        """
        _check_no_cache_with_segments(kv is not None, segments)
        dtype = self.q.dtype
        x = x.astype(dtype)
        q = _project("btd,dnh->btnh", x, self.q[...], self.q_bias[...])
        k = _project("btd,dkh->btkh", x, self.k[...], self.k_bias[...])
        v = _project("btd,dkh->btkh", x, self.v[...], self.v_bias[...])
        if lora:
            projected = {"q": q, "k": k, "v": v}
            for i, name in enumerate(projected):
                if name in lora:
                    projected[name] = projected[name] + _lora_delta(_lora_dropout(x, lora, i), lora[name],
                                                                    "btd,dr->btr", "btr,rnh->btnh")
            q, k, v = projected["q"], projected["k"], projected["v"]
        q, k = attention.apply_rope(q, *rope).astype(dtype), attention.apply_rope(k, *rope).astype(dtype)
        v = v.astype(dtype)
        if kv is None:
            out = attention.attend(q, k, v, self.sinks[...], positions, positions, window, segments, segments)
        else:
            slot_positions, slots = view
            new_kv = {"k": cache.scatter(kv["k"], slots, k), "v": cache.scatter(kv["v"], slots, v)}
            if q.shape[1] == 1:  # decode: the token is in its slot now (a ring keeps the last `window`)
                key_positions = cache.scatter(slot_positions, slots, positions)
                keys, values = new_kv["k"].astype(dtype), new_kv["v"].astype(dtype)
            else:  # a chunk: a ring may overwrite slots its own first tokens still need
                keys = jnp.concatenate([kv["k"].astype(dtype), k], axis=1)
                values = jnp.concatenate([kv["v"].astype(dtype), v], axis=1)
                key_positions = jnp.concatenate([slot_positions, positions], axis=1)
            out = attention.attend(q, keys, values, self.sinks[...], positions, key_positions, window)
            kv = new_kv
        y = _project("btnh,nhd->btd", out.astype(dtype), self.o[...], self.o_bias[...])
        if lora and "o" in lora:
            y = y + _lora_delta(_lora_dropout(out, lora, 3), lora["o"], "btnh,nhr->btr", "btr,rd->btd")
        return y, kv


EXPERT_AXES = {"gate_up": ("experts", "embed", "expert_mlp"), "down": ("experts", "expert_mlp", "embed")}
"""Logical axes of the dense expert matrices [e, in, out]."""
MXFP4_EXPERT_AXES = {
    "gate_up": {"blocks": ("experts", "expert_mlp", "mxfp4_bytes", "embed"), "scales": ("experts", "expert_mlp", "embed")},
    "down": {"blocks": ("experts", "embed", "mxfp4_bytes", "expert_mlp"), "scales": ("experts", "embed", "expert_mlp")},
}
"""Logical axes of MXFP4 expert matrices: blocks [e, out, 16, in/32], scales [e, out, in/32] (see
`gptoss_jax.mxfp4`); the blocks of `in` carry its logical name, so both formats shard alike."""


def _mxfp4_weight(rngs: nnx.Rngs, experts: int, out: int, fan_in: int, axes: dict[str, tuple[str, ...]]
                  ) -> tuple[nnx.Param, nnx.Param]:
    """Declares one MXFP4 expert matrix: random codes, scales near fan_in ** -0.5 / rms(e2m1 codes)."""
    groups = fan_in // 32
    blocks = jax.random.randint(rngs.params(), (experts, out, 16, groups), 0, 256, jnp.int32).astype(jnp.uint8)
    exponent = round(127 + math.log2(fan_in ** -0.5 / 2.93))  # 2.93: rms of the 16 e2m1 values
    scales = exponent + jax.random.randint(rngs.params(), (experts, out, groups), -1, 2, jnp.int32)
    return nnx.Param(blocks, axes=axes["blocks"]), nnx.Param(scales.astype(jnp.uint8), axes=axes["scales"])


class MoE(nnx.Module):
    """Top-k router (top-k on logits, softmax over the k) and experts with clamped SwiGLU."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs):
        d, e, i = config.hidden, config.num_experts, config.intermediate
        self.config = config
        self.router = _weight(rngs, (d, e), ("embed", "router_experts"), dtype, fan_in=d)
        self.router_bias = _weight(rngs, (e,), ("router_experts",), dtype, std=0.02)
        # gate_up columns interleave gate (even) and up (odd), as in the released checkpoints.
        if config.expert_format == "mxfp4":
            self.gate_up_blocks, self.gate_up_scales = _mxfp4_weight(rngs, e, 2 * i, d, MXFP4_EXPERT_AXES["gate_up"])
            self.down_blocks, self.down_scales = _mxfp4_weight(rngs, e, d, i, MXFP4_EXPERT_AXES["down"])
        else:
            self.gate_up = _weight(rngs, (e, d, 2 * i), EXPERT_AXES["gate_up"], dtype, fan_in=d)
            self.down = _weight(rngs, (e, i, d), EXPERT_AXES["down"], dtype, fan_in=i)
        self.gate_up_bias = _weight(rngs, (e, 2 * i), ("experts", "expert_mlp"), dtype, std=0.02)
        self.down_bias = _weight(rngs, (e, d), ("experts", "embed"), dtype, std=0.02)

    def _matrix(self, name: str) -> moe.ExpertMatrix:
        """The expert matrix `name` as `moe.expert_matmul` takes it: an array, or MXFP4 {"blocks", "scales"}."""
        if self.config.expert_format == "mxfp4":
            return {"blocks": getattr(self, f"{name}_blocks")[...], "scales": getattr(self, f"{name}_scales")[...]}
        return getattr(self, name)[...]

    def __call__(self, x: jax.Array, layer: jax.Array | None = None, lora: Lora | None = None) -> jax.Array:
        """x [b, t, d] -> [b, t, d]. With `layer`, the expert matrices hold every layer's experts
        ([layers, e, ...], read in place) and `layer` says which to use. `lora` may adapt the router
        ([d, e] is small: merged) and the experts (per expert, inside the grouped matmul)."""
        lora = lora or {}
        router = self.router[...].astype(jnp.float32)
        if "router" in lora:
            router = router + lora["router"]["a"] @ lora["router"]["b"]
        expert_ids, expert_weights = moe.route(x, router, self.router_bias[...],
                                               self.config.experts_per_token)
        expert_lora = {name: lora[name] for name in EXPERT_MATRICES if name in lora} or None
        return moe.experts(x.astype(self.gate_up_bias.dtype), expert_ids, expert_weights, self._matrix("gate_up"),
                           self.gate_up_bias[...], self._matrix("down"), self.down_bias[...],
                           alpha=self.config.swiglu_alpha, limit=self.config.swiglu_limit, layer=layer,
                           lora=expert_lora)


class Block(nnx.Module):
    """One decoder layer: x += attention(norm(x)); x += moe(norm(x))."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs, window: int | None):
        self.window = window
        self.attn_norm = RMSNorm(config, rngs)
        self.attn = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config, rngs)
        self.mlp = MoE(config, dtype, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
                 kv: KV | None = None, view: CacheView | None = None, layer: jax.Array | None = None,
                 lora: Lora | None = None, segments: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
        """x [b, t, d] -> ([b, t, d], updated kv); `segments` [b, t] as `Attention` takes them."""
        lora = lora or {}
        attended, kv = self.attn(self.attn_norm(x), positions, rope, self.window, kv, view, lora.get("attn"),
                                 segments)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x), layer, lora.get("mlp")), kv


class LayerPair(nnx.Module):
    """A sliding-window layer (even index) followed by a full-attention layer (odd index)."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs):
        self.sliding = Block(config, dtype, rngs, window=config.sliding_window)
        self.full = Block(config, dtype, rngs, window=None)

    def __call__(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
                 kv: dict[str, KV] | None = None, views: dict[str, CacheView] | None = None,
                 layer: jax.Array | None = None, lora: Lora | None = None, segments: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, dict[str, KV] | None]:
        """Returns the output, both layers' outputs [2, b, t, d], and the pair's updated cache."""
        kv, views, lora = kv or {}, views or {}, lora or {}
        after_sliding, sliding_kv = self.sliding(x, positions, rope, kv.get("sliding"), views.get("sliding"), layer,
                                                 lora.get("sliding"), segments)
        after_full, full_kv = self.full(after_sliding, positions, rope, kv.get("full"), views.get("full"), layer,
                                        lora.get("full"), segments)
        new_kv = {"sliding": sliding_kv, "full": full_kv} if kv else None
        return after_full, jnp.stack([after_sliding, after_full]), new_kv


class Transformer(nnx.Module):
    """Embedding, `num_layer_pairs` stacked LayerPairs, final norm, untied unembedding."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden, config.vocab_size
        self.embed = _weight(rngs, (v, d), ("vocab", "embed"), dtype, std=1.0)

        @nnx.split_rngs(splits=config.num_layer_pairs)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_pairs(rngs: nnx.Rngs) -> LayerPair:
            return LayerPair(config, dtype, rngs)

        self.layers = make_pairs(rngs)
        self.norm = RMSNorm(config, rngs)
        self.unembed = _weight(rngs, (v, d), ("vocab", "embed"), dtype, fan_in=d)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, kv_cache: cache.Cache | None = None,
                 lora: Lora | None = None, remat: str | None = None, segments: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, cache.Cache | None]:
        """tokens int32 [b, t] -> (final normed hidden float32 [b, t, d], each layer's output
        [layers, b, t, d], updated cache or None). `logits` maps the first to the vocabulary.

        `lora`: adapters {"layers": {"sliding" | "full": ...}} stacked like the layer params (see
        `Lora`). `remat`: rematerialize each layer pair in the backward pass: "full" saves only the
        pair's input, "dots" also the matmul outputs (see `REMAT_POLICIES`). `segments` int32 [b, t]
        (without `kv_cache` only): ids of examples packed in one row, each with positions from 0;
        tokens attend only within their own segment."""
        _check_no_cache_with_segments(kv_cache is not None, segments)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        table = _constrain(self.embed[...], ("vocab", "act_embed"))  # whole rows (FSDP gathers them)
        x = bits.read(table, tokens).astype(jnp.float32)  # the residual stream is float32
        x = _constrain(x, ("batch", "seq", "act_embed"))
        rope = attention.rope_cos_sin(self.config, positions)
        pair_graph, pair_params = nnx.split(self.layers)
        views, kv, new_positions = {}, None, {}
        if kv_cache is not None:
            kv = {kind: {"k": kv_cache[kind]["k"], "v": kv_cache[kind]["v"]} for kind in cache.KINDS}
            for kind in cache.KINDS:
                slot_positions = kv_cache[kind]["positions"]
                slots = cache.write_slots(slot_positions, positions, ring=kind == "sliding")
                views[kind] = (slot_positions, slots)
                new_positions[kind] = cache.scatter(slot_positions, slots, positions)

        def one_pair(x: jax.Array, index_and_kv: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            # Expert matrices stay stacked and are indexed by layer inside the expert matmul: XLA
            # copies any slice taken here, and those copies would cost more than the matmuls.
            index, pair_kv, pair_lora = index_and_kv
            params = jax.tree_util.tree_map_with_path(
                lambda path, w: w if _key_name(path[-2]) in STACKED_IN_PLACE else bits.read(w, index), pair_params)
            x, hidden, pair_kv = nnx.merge(pair_graph, params)(x, positions, rope, pair_kv, views, index, pair_lora,
                                                               segments)
            return x, (hidden, pair_kv)

        if remat is not None:
            one_pair = jax.checkpoint(one_pair, policy=REMAT_POLICIES[remat], prevent_cse=False)
        pair_index = jnp.arange(self.config.num_layer_pairs)
        lora_layers = (lora or {}).get("layers")
        x, (hidden, kv) = jax.lax.scan(one_pair, x, (pair_index, kv, lora_layers))
        hidden = hidden.reshape(-1, *hidden.shape[2:])  # [pairs, 2, b, t, d] -> [layers, b, t, d]
        new_cache = None
        if kv_cache is not None:
            new_cache = {kind: {**kv[kind], "positions": new_positions[kind]} for kind in cache.KINDS}
        return self.norm(x), hidden, new_cache

    def logits(self, x: jax.Array) -> jax.Array:
        """Final normed hidden [..., d] -> float32 logits [..., vocab]."""
        table = self.unembed[...]
        return _unembed(x.astype(bits.value_dtype(table)), table)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""Rematerialization policies for `Transformer.__call__(remat=...)` (training on long sequences)."""


@functools.lru_cache(maxsize=None)
def graph_def(config: Config) -> nnx.GraphDef:
    """The module structure for `config` (no weights allocated)."""
    graph, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, jnp.float32, nnx.Rngs(0))))
    return graph


def build(config: Config, params: Params) -> Transformer:
    """The NNX module for `config` holding `params` (inside or outside `jax.jit`)."""
    return nnx.merge(graph_def(config), params)


def forward(config: Config, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
            *, segments: jax.Array | None = None, return_hidden: bool = False,
            lora: Lora | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits float32 [b, t, vocab] for int32 `tokens` [b, t].

    `positions` [b, t] defaults to 0..t-1 per row; a negative position marks a padding token, which
    no other token attends to. `segments` int32 [b, t]: several examples packed in one row (ids 1, 2,
    ..., positions restarting at 0 in each); a token attends only to its own example's tokens.
    With `return_hidden`, also returns each layer's output [layers, b, t, d].
    `lora`: LoRA adapters applied on the fly (see `Lora`; `gptoss_jax.train.lora` makes them).
    """
    model = build(config, params)
    x, hidden, _ = model(tokens, positions, lora=lora, segments=segments)
    logits = model.logits(x)
    return (logits, hidden) if return_hidden else logits
