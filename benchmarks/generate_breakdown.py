"""`bench_generate.py --breakdown`: gptoss-jax's pieces timed alone (best of 5 after one warm-up,
each jitted on its own) for one prefill chunk and for decode steps: a full-attention layer and a
sliding-window layer (each with its cache update), a MoE layer and the unembedding, against the
whole `extend` / `decode_step`.

The layers are the model's own modules (`gptoss_jax.model.Block`, one per kind, built alone with
random weights of the config's shapes and dtype), called through their public `__call__`s; nothing
is sliced out of the stacked weights. So the MoE layer reads its experts [e, ...] as a model of one
layer would, where the whole model indexes its stacked [layers, e, ...] experts in place: a close
estimate of that piece, not the same kernel. Works for dense and MXFP4 expert formats alike
(`--breakdown-config`); a piece that fails (the modules' signatures may change) is reported, not raised.
"""

from __future__ import annotations

import argparse
from typing import Any

import common
from common import log
from generate_workers import CHUNK, CONFIG_PATH


def worker_breakdown(args: argparse.Namespace, sizes: dict) -> dict:
    """Times the pieces for each case (see the module's docstring); {case: {piece: seconds}}."""
    common.count_compiles()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gptoss_jax.ops import attention
    from gptoss_jax import cache as kv_cache
    from gptoss_jax.config import load_config
    from gptoss_jax.generate import Sampling, _bucket, decode_step, extend
    from gptoss_jax.model import Block, build
    from gptoss_jax.params import init_params

    config = load_config(getattr(args, "breakdown_config", None) or CONFIG_PATH)
    params = init_params(config, args.seed, jnp.float32)
    blocks = {kind: nnx.split(Block(config, jnp.float32, nnx.Rngs(i), window))
              for i, (kind, window) in enumerate((("sliding", config.sliding_window), ("full", None)))}
    log(f"breakdown on {config.name} (experts {config.expert_format})")

    def best(fn: Any, *fn_args: Any, reps: int = 5, fresh: Any = None) -> float:
        return min(common.run_times(fn, *fn_args, repeats=reps, fresh=fresh)[0])

    def setup(b: int, t: int, start: int, slots: int) -> tuple[Any, Any, Any]:
        """A cache of `slots` full-layer slots holding positions 0..start-1 (random k, v); new tokens
        at start..start+t-1."""
        cache = kv_cache.init_cache(config, b, slots, jnp.float32)
        for kind in kv_cache.KINDS:
            width = cache[kind]["positions"].shape[1]
            held = np.full((b, width), -1, np.int32)
            low, high = (max(0, start - width), start) if kind == "sliding" else (0, min(start, width))
            for position in range(low, high):  # a ring holds position p in slot p % width
                held[:, position % width] = position
            cache[kind]["positions"] = jnp.asarray(held)
            for i, name in enumerate(("k", "v")):
                cache[kind][name] = jax.random.normal(jax.random.key(i), cache[kind][name].shape, jnp.float32)
        positions = jnp.asarray(np.arange(start, start + t, dtype=np.int32)[None].repeat(b, 0))
        x = jax.random.normal(jax.random.key(3), (b, t, config.hidden), jnp.float32)
        return cache, positions, x

    def pieces(b: int, t: int, start: int, slots: int) -> dict[str, float]:
        cache, positions, x = setup(b, t, start, slots)
        out: dict[str, float] = {}
        for kind in ("full", "sliding"):
            graph, state = blocks[kind]
            slot_positions = cache[kind]["positions"]
            write = kv_cache.write_slots(slot_positions, positions, ring=kind == "sliding")
            kv = {"k": cache[kind]["k"][0], "v": cache[kind]["v"][0]}

            @jax.jit
            def attn(state: Any, x: Any, kv: Any, slot_positions: Any, write: Any, positions: Any,
                     graph: Any = graph) -> Any:
                block = nnx.merge(graph, state)
                rope = attention.rope_cos_sin(config, positions)
                return block.attn(block.attn_norm(x), positions, rope, block.window, kv, (slot_positions, write))

            out[f"attention layer ({kind}), with cache update"] = best(attn, state, x, kv, slot_positions, write,
                                                                       positions)
        graph, state = blocks["full"]

        @jax.jit
        def moe_layer(state: Any, x: Any) -> Any:
            block = nnx.merge(graph, state)
            return block.mlp(block.mlp_norm(x))

        out["MoE layer (router + experts)"] = best(moe_layer, state, x)
        out["unembedding (last position)"] = best(jax.jit(lambda p, x: build(config, p).logits(x[:, -1])), params, x)
        if b > 1:  # reference: the same product with the operands swapped (another XLA CPU kernel)
            out["  ref: unembedding as einsum('vd,bd->vb')"] = best(
                jax.jit(lambda w, x: jnp.einsum("vd,bd->vb", w, x[:, -1])), params["unembed"], x)
        if t > 1:  # reference: dense float32 matmuls doing the MoE layer's useful FLOPs (t * top-k rows)
            rows = jnp.ones((b * t * config.experts_per_token, config.hidden), jnp.float32)
            expert = (jnp.ones((config.hidden, 2 * config.intermediate), jnp.float32),
                      jnp.ones((config.intermediate, config.hidden), jnp.float32))
            out["  ref: dense matmuls with the MoE layer's useful FLOPs"] = best(
                jax.jit(lambda r, w1, w2: (r @ w1)[:, : config.intermediate] @ w2), rows, *expert)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, min(config.vocab_size, 199998), (b, t))
                             .astype(np.int32))

        def fresh() -> tuple:
            return (jax.block_until_ready(jax.tree.map(jnp.copy, cache)),)

        if t > 1:
            out["WHOLE extend (all layers)"] = best(lambda c: extend(config, params, c, tokens, positions),
                                                    reps=3, fresh=fresh)
        else:
            out["WHOLE decode_step (+ argmax)"] = best(
                lambda c: decode_step(config, Sampling(), params, c, tokens[:, 0], positions[:, 0],
                                      jax.random.key(0)), fresh=fresh)
        out["sum: pairs x (attention full + sliding) + layers x MoE + unembedding"] = (
            config.num_layer_pairs * (out["attention layer (full), with cache update"]
                                      + out["attention layer (sliding), with cache update"])
            + config.num_layers * out["MoE layer (router + experts)"] + out["unembedding (last position)"])
        return out

    p, d, bn, lg, ln = sizes["prompt"], sizes["decode_new"], sizes["batch_new"], sizes["long"], sizes["long_new"]
    long_slots = min(_bucket(lg + ln), config.max_positions)
    cases = {
        f"prefill chunk {CHUNK} (last of {sizes['prefill']}), cache {sizes['prefill']}":
            dict(b=1, t=CHUNK, start=sizes["prefill"] - CHUNK, slots=sizes["prefill"]),
        f"decode b=1 at {p + d // 2}, cache {_bucket(p + d + 1)}": dict(b=1, t=1, start=p + d // 2, slots=_bucket(p + d + 1)),
        f"decode b={sizes['batch']} at {p + bn // 2}, cache {_bucket(p + bn + 1)}":
            dict(b=sizes["batch"], t=1, start=p + bn // 2, slots=_bucket(p + bn + 1)),
        f"decode b=1 at {lg + 16}, cache {long_slots} (generate's bucket)": dict(b=1, t=1, start=lg + 16, slots=long_slots),
        f"decode b=1 at {lg + 16}, cache {lg + ln} (exact)": dict(b=1, t=1, start=lg + 16, slots=lg + ln),
    }
    result = {}
    for name, case in cases.items():
        log(f"breakdown: {name}")
        try:
            result[name] = pieces(**case)
        except Exception as err:  # the modules' signatures may change; the benchmark must not fail
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        for piece, seconds in result[name].items():
            log(f"  {piece:70s} {seconds * 1e3:10.1f} ms" if isinstance(seconds, float) else f"  {piece}: {seconds}")
    return result
