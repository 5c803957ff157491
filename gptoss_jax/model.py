"""gpt-oss as Flax NNX modules, used functionally through `forward(config, params, tokens)`.

Each weight is declared once, here, with its shape, dtype and logical axis names (the `axes`
metadata of `nnx.Param`). Layers come in (sliding, full) pairs stacked along a leading `layers`
axis and run under one `jax.lax.scan`, so the compiled program holds one pair whatever the depth.

Dimension letters in einsums: b batch, t/s query/key positions, d hidden, n query heads,
k KV heads, g query heads per KV head, h head dim, e experts, v vocabulary.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import adapted, cache, moe
from gptoss_jax.axes import ATTENTION_MATRICES, EXPERT_AXES, EXPERT_MATRICES, TOKENS
from gptoss_jax.config import Config
from gptoss_jax.ops import attention, bits, matmul, parallel
from gptoss_jax.quant import FORMATS

Params = dict[str, Any]
"""A plain nested dict of arrays: the model's weights (see `params.py` for their paths)."""
KV = dict[str, jax.Array]
"""One layer's cached keys and values: {"k", "v"} [b, s, kv_heads, head_dim]."""
Group = tuple[jax.Array, jax.Array, Any]
"""One batch of `Transformer.extend_groups`: (tokens int32 [b, t], positions int32 [b, t], its cache)."""
Groups = tuple[Any, ...]
"""One entry per group (activations, positions, caches or their views), as the layers pass them on."""
CacheView = tuple[jax.Array, jax.Array, jax.Array]
"""What a layer needs to know of its cache's slots: (slot positions [b, s] before this step, write
slots [b, t], slot positions after it [b, s])."""


def _random(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    """Uniform in +-sqrt(3) std (standard deviation `std`): a normal's inverse-erf transform made
    compiling a model's initialization a third slower (tiny-a at -O0: 3.1 s against 2.0 s)."""
    bound = std * math.sqrt(3.0)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)


def _weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any,
            fan_in: int | None = None, std: float | None = None) -> nnx.Param:
    """Declares one weight: random init with standard deviation `std` or `fan_in ** -0.5`."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(_random(rngs, shape, std if std is not None else fan_in ** -0.5, dtype), axes=axes)


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
                               + _random(rngs, (config.hidden,), 0.1, jnp.float32), axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> [..., d]."""
        t = x.astype(jnp.float32)
        t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + self.eps)
        return (self.scale.get_value() * t).astype(x.dtype)


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
                 segments: jax.Array | None = None, layer: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
        """x [b, t, d], positions [b, t] (negative: padding), rope (cos, sin) [b, t, h/2] -> [b, t, d].

        With a cache: `kv` holds every layer's cached {"k", "v"} of this kind [pairs, b, kv_heads, s, h],
        `layer` says which is this one's and `view` where the new tokens go (`CacheView`); they are
        written in place, then attend to the cached ones and to each other (no copy of the cache),
        and the updated `kv` is returned.
        `segments` int32 [b, t] (no cache only): packed examples' ids; a token attends only within its own.
        """
        _check_no_cache_with_segments(kv is not None, segments)
        dtype = matmul.dtype_of(self.q.get_value())
        x = x.astype(dtype)
        q = matmul.project("btd,dnh->btnh", x, self.q.get_value(), self.q_bias.get_value())
        k = matmul.project("btd,dkh->btkh", x, self.k.get_value(), self.k_bias.get_value())
        v = matmul.project("btd,dkh->btkh", x, self.v.get_value(), self.v_bias.get_value())
        q, k = attention.apply_rope(q, *rope).astype(dtype), attention.apply_rope(k, *rope).astype(dtype)
        k, v = k.swapaxes(1, 2), v.astype(dtype).swapaxes(1, 2)  # [b, kv_heads, t, h], as attention reads them
        sinks = self.sinks.get_value()
        if kv is None:
            out = attention.attend(q, k, v, sinks, positions, positions, window, segments, segments, in_order=True)
        else:
            old_positions, slots, new_positions = view
            new_kv = {name: cache.scatter_layer(kv[name], layer, slots, new) for name, new in (("k", k), ("v", v))}
            if window is None or q.shape[1] == 1:  # the new tokens are in their slots: attend to the cache
                out = attention.attend(q, new_kv["k"], new_kv["v"], sinks, positions, new_positions, window,
                                       layer=layer)
            else:  # a chunk into a ring may overwrite slots its own first tokens still need: ring + chunk
                keys = jnp.concatenate([bits.read(kv["k"], layer).astype(dtype), k], axis=2)
                values = jnp.concatenate([bits.read(kv["v"], layer).astype(dtype), v], axis=2)
                key_positions = jnp.concatenate([old_positions, positions], axis=1)
                out = attention.attend(q, keys, values, sinks, positions, key_positions, window)
            kv = new_kv
        y = matmul.project("btnh,nhd->btd", out.astype(dtype), self.o.get_value(), self.o_bias.get_value())
        return y, kv


def _expert_matrix(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any,
                   expert_format: str) -> nnx.Param:
    """Declares one expert matrix [e, in, out]: dense in `dtype`, or a quantized weight of `expert_format`."""
    if expert_format == "dense":
        return _weight(rngs, shape, axes, dtype, fan_in=shape[-2])
    return nnx.Param(FORMATS[expert_format].random(rngs.params(), rngs.params(), shape), axes=axes)


class MoE(nnx.Module):
    """Top-k router (top-k on logits, softmax over the k) and experts with clamped SwiGLU."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs):
        d, e, i = config.hidden, config.num_experts, config.intermediate
        self.config = config
        self.router = _weight(rngs, (d, e), ("embed", "router_experts"), dtype, fan_in=d)
        self.router_bias = _weight(rngs, (e,), ("router_experts",), dtype, std=0.02)
        # gate_up columns interleave gate (even) and up (odd), as in the released checkpoints.
        self.gate_up = _expert_matrix(rngs, (e, d, 2 * i), EXPERT_AXES["gate_up"], dtype, config.expert_format)
        self.down = _expert_matrix(rngs, (e, i, d), EXPERT_AXES["down"], dtype, config.expert_format)
        self.gate_up_bias = _weight(rngs, (e, 2 * i), ("experts", "expert_mlp"), dtype, std=0.02)
        self.down_bias = _weight(rngs, (e, d), ("experts", "embed"), dtype, std=0.02)

    def __call__(self, x: jax.Array, layer: jax.Array | None = None, valid: jax.Array | None = None) -> jax.Array:
        """x [b, t, d] -> [b, t, d]. With `layer`, the expert matrices hold every layer's experts
        ([layers, e, ...], read in place) and `layer` says which to use; tokens where `valid`
        [b, t] is False (padding) may skip the experts (`moe.experts`)."""
        expert_ids, expert_weights = moe.route(x, self.router.get_value(), self.router_bias.get_value(),
                                               self.config.experts_per_token)
        return moe.experts(x.astype(self.gate_up_bias.dtype), expert_ids, expert_weights, self.gate_up.get_value(),
                           self.gate_up_bias.get_value(), self.down.get_value(), self.down_bias.get_value(),
                           alpha=self.config.swiglu_alpha, limit=self.config.swiglu_limit, layer=layer,
                           valid=valid, activations=self.config.expert_activations)


class Block(nnx.Module):
    """One decoder layer: x += attention(norm(x)); x += moe(norm(x))."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs, window: int | None):
        self.window = window
        self.attn_norm = RMSNorm(config, rngs)
        self.attn = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm(config, rngs)
        self.mlp = MoE(config, dtype, rngs)

    def __call__(self, xs: Groups, positions: Groups, ropes: Groups, kvs: Groups, views: Groups,
                 layer: jax.Array | None = None, segments: jax.Array | None = None) -> tuple[Groups, Groups]:
        """Each group's x [b, t, d] -> (its [b, t, d], its updated kv). Every group attends to its own
        cache; their tokens go through the MoE together (its expert weights read once for all).
        `segments` [b, t] (one group, no cache) as `Attention` takes them."""
        outs, new_kvs = [], []
        for x, group_positions, rope, kv, view in zip(xs, positions, ropes, kvs, views):
            attended, kv = self.attn(self.attn_norm(x), group_positions, rope, self.window, kv, view, segments, layer)
            outs.append(x + attended)
            new_kvs.append(kv)
        if len(outs) == 1:
            x = outs[0]
            return (x + self.mlp(self.mlp_norm(x), layer, positions[0] >= 0),), tuple(new_kvs)
        flat = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in outs])  # [sum of b * t, d]
        valid = jnp.concatenate([p.reshape(-1) >= 0 for p in positions])
        moe_out = self.mlp(self.mlp_norm(flat), layer, valid)
        ends = list(itertools.accumulate(x.shape[0] * x.shape[1] for x in outs))
        parts = [moe_out[end - x.shape[0] * x.shape[1]: end] for x, end in zip(outs, ends)]
        return tuple(x + part.reshape(x.shape) for x, part in zip(outs, parts)), tuple(new_kvs)


def _kind(tree: Groups, kind: str) -> Groups:
    """Each group's entry for a cache kind (None for a group without a cache)."""
    return tuple(None if entry is None else entry[kind] for entry in tree)


class LayerPair(nnx.Module):
    """A sliding-window layer (even index) followed by a full-attention layer (odd index)."""

    def __init__(self, config: Config, dtype: Any, rngs: nnx.Rngs):
        self.sliding = Block(config, dtype, rngs, window=config.sliding_window)
        self.full = Block(config, dtype, rngs, window=None)

    def __call__(self, xs: Groups, positions: Groups, ropes: Groups, kvs: Groups, views: Groups,
                 layer: jax.Array | None = None, segments: jax.Array | None = None
                 ) -> tuple[Groups, Groups, Groups]:
        """Per group (see `Block`): the output, both layers' outputs [2, b, t, d], the pair's updated cache."""
        after_sliding, sliding_kv = self.sliding(xs, positions, ropes, _kind(kvs, "sliding"), _kind(views, "sliding"),
                                                 layer, segments)
        after_full, full_kv = self.full(after_sliding, positions, ropes, _kind(kvs, "full"), _kind(views, "full"),
                                        layer, segments)
        new_kvs = tuple(None if kv is None else {"sliding": s, "full": f}
                        for kv, s, f in zip(kvs, sliding_kv, full_kv))
        return after_full, tuple(jnp.stack(both) for both in zip(after_sliding, after_full)), new_kvs


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
                 remat: str | None = None, segments: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, cache.Cache | None]:
        """tokens int32 [b, t] -> (final normed hidden float32 [b, t, d], each layer's output
        [layers, b, t, d], updated cache or None). `logits` maps the first to the vocabulary.

        `remat`: rematerialize each layer pair in the backward pass: "full" saves only the pair's
        input, "dots" also the matmul outputs (see `REMAT_POLICIES`). `segments` int32 [b, t]
        (without `kv_cache` only): ids of examples packed in one row, each with positions from 0;
        tokens attend only within their own segment."""
        _check_no_cache_with_segments(kv_cache is not None, segments)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        (x,), (hidden,), (new_cache,) = self._layers(((tokens, positions, kv_cache),), remat, segments)
        return x, hidden, new_cache

    def extend_groups(self, groups: Sequence[Group]) -> list[tuple[jax.Array, cache.Cache]]:
        """Several batches, each with its own KV cache, through the layers in one pass: per group
        (tokens int32 [b, t], positions [b, t], cache) -> (final normed hidden float32 [b, t, d],
        updated cache). Each group attends only to its own cache; all groups' tokens meet in the
        MoE, so the expert weights are read once for all (a prompt chunk with the decode slots)."""
        xs, _, caches = self._layers(tuple(groups), None, None)
        return list(zip(xs, caches))

    def _layers(self, groups: tuple[Group, ...], remat: str | None, segments: jax.Array | None
                ) -> tuple[Groups, Groups, Groups]:
        """Every group through embedding, layers and final norm: (hidden, layer outputs, caches) per group."""
        table = parallel.constrain(self.embed.get_value(), ("vocab", "act_embed"))  # whole rows (FSDP gathers them)
        xs, ropes, kvs, views, new_positions = [], [], [], [], []
        for tokens, positions, kv_cache in groups:
            x = matmul.embed(table, tokens).astype(jnp.float32)  # the residual stream is float32
            xs.append(parallel.constrain(x, TOKENS))
            ropes.append(attention.rope_cos_sin(self.config, positions))
            if kv_cache is None:
                kvs.append(None), views.append(None), new_positions.append(None)
                continue
            kvs.append({kind: {"k": kv_cache[kind]["k"], "v": kv_cache[kind]["v"]} for kind in cache.KINDS})
            view, written = {}, {}
            for kind in cache.KINDS:
                slot_positions = kv_cache[kind]["positions"]
                slots = cache.write_slots(slot_positions, positions, ring=kind == "sliding")
                written[kind] = cache.scatter(slot_positions, slots, positions)
                view[kind] = (slot_positions, slots, written[kind])
            views.append(view), new_positions.append(written)
        positions = tuple(group[1] for group in groups)
        ropes, views = tuple(ropes), tuple(views)
        pair_graph, pair_state = nnx.split(self.layers)
        pair_params = nnx.to_pure_dict(pair_state)

        def one_pair(carry: tuple[Groups, Groups], index: jax.Array) -> tuple[tuple[Groups, Groups], Groups]:
            # Expert matrices, attention projections (as views) and the KV cache stay stacked and are
            # read (and the cache written) at `index` in place: XLA copies any slice taken here, and
            # for the cache it also kept a second whole cache for the scan's output (3 GiB for
            # gpt-oss-20b at 128k).
            xs, kvs = carry
            params = bits.layer_slice(pair_params, index, keep=EXPERT_MATRICES, views=ATTENTION_MATRICES)
            xs, hidden, kvs = nnx.merge(pair_graph, params)(xs, positions, ropes, kvs, views, index, segments)
            return (xs, kvs), hidden

        if remat is not None:
            one_pair = jax.checkpoint(one_pair, policy=REMAT_POLICIES[remat], prevent_cse=False)
        pair_index = jnp.arange(self.config.num_layer_pairs)
        (xs, kvs), hidden = jax.lax.scan(one_pair, (tuple(xs), tuple(kvs)), pair_index)
        hidden = tuple(h.reshape(-1, *h.shape[2:]) for h in hidden)  # [pairs, 2, b, t, d] -> [layers, b, t, d]
        caches = tuple(None if kv is None else {kind: {**kv[kind], "positions": written[kind]} for kind in cache.KINDS}
                       for kv, written in zip(kvs, new_positions))
        return tuple(self.norm(x) for x in xs), hidden, caches

    def logits(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """Final normed hidden [..., d] -> float32 logits [..., vocab]; where `valid` bool [...] is
        False (an idle slot) the logits are unspecified and may not be computed."""
        return matmul.unembed(x, self.unembed.get_value(), chunked=parallel.current() is None, valid=valid)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""Rematerialization policies for `Transformer.__call__(remat=...)` (training on long sequences)."""


def abstract_model(config: Config, dtype: Any) -> Transformer:
    """The model for `config` with `jax.ShapeDtypeStruct`s for weights (nothing allocated), whatever
    mesh is in context (nnx.eval_shape would otherwise try to place each weight on it)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(lambda: Transformer(config, dtype, nnx.Rngs(0)))


@functools.lru_cache(maxsize=None)
def graph_def(config: Config) -> nnx.GraphDef:
    """The module structure for `config` (no weights allocated)."""
    graph, _ = nnx.split(abstract_model(config, jnp.float32))
    return graph


def build(config: Config, params: Params) -> Transformer:
    """The NNX module for `config` holding `params` (inside or outside `jax.jit`). `params` may hold
    bfloat16 weights as their bits (`ops.bits.as_bits`) and LoRA-adapted weights (`adapted.attach`)."""
    return nnx.merge(graph_def(config), params)


def forward(config: Config, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
            *, segments: jax.Array | None = None, return_hidden: bool = False,
            lora: Params | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Logits float32 [b, t, vocab] for int32 `tokens` [b, t].

    `positions` [b, t] defaults to 0..t-1 per row; a negative position marks a padding token, which
    no other token attends to; valid positions advance by one along a row (within each segment). `segments` int32 [b, t]: several examples packed in one row (ids 1, 2,
    ..., positions restarting at 0 in each); a token attends only to its own example's tokens.
    With `return_hidden`, also returns each layer's output [layers, b, t, d].
    `lora`: LoRA adapters (`gptoss_jax.train.lora.model_adapters`), attached where the weights are read.
    """
    model = build(config, adapted.attach(bits.as_bits(params), lora))
    x, hidden, _ = model(tokens, positions, segments=segments)
    logits = model.logits(x)
    return (logits, hidden) if return_hidden else logits
