"""The engine's device state, a plain pytree, and the jitted slot operations on it (state donated).

    {"cache": the KV cache for `slots` rows of `max_context` positions (see `cache.py`),
     "tokens": int32 [S] each slot's last token (the next one to feed), "positions": int32 [S] its
     position, "active": bool [S] decoding, "count": int32 [S] tokens made so far, "budget": int32 [S],
     "temperature", "top_p", "min_p": float32 [S], "top_k": int32 [S], "seed": uint32 [S, 2],
     "stops": int32 [S, T] (-1: none), "forced": int32 [S, F], "forced_len": int32 [S],
     "allowed": bool [S, vocab]}

`begin` readies a slot for a request (keeping its cache below a position, for prefix reuse),
`step` runs one decode step of every decoding slot together with one prompt chunk into each of
several other slots' rows (on a prompt's last chunk it makes the request's first token), `decode`
runs up to a given number of decode steps over all slots with per-slot stop checks, `release`
frees a slot. Inactive slots are fed at position -1, so their cache rows are never written.
Token i of a request is forced[i] while i < forced_len, else drawn with fold_in(key(seed), i).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax import cache as kv_cache
from gptoss_jax.axes import CACHE_AXES
from gptoss_jax.config import Config
from gptoss_jax.engine.sampling import request_key, sample_rows
from gptoss_jax.generate import extend
from gptoss_jax.model import Params, build

State = dict[str, Any]
SETTINGS = ("budget", "temperature", "top_k", "top_p", "min_p", "seed", "stops", "forced", "forced_len", "allowed")
"""The per-slot rows `begin` writes (one request's settings)."""


def init_state(config: Config, slots: int, max_context: int, dtype: Any, max_stops: int, max_forced: int) -> State:
    """An empty state: every slot free, the cache empty (constrained to its sharding on a mesh)."""
    zeros = functools.partial(jnp.zeros, (slots,))
    return pin({"cache": kv_cache.constrain(kv_cache.init_cache(config, slots, max_context, dtype)),
            "tokens": zeros(jnp.int32), "positions": jnp.full((slots,), -1, jnp.int32), "active": zeros(bool),
            "count": zeros(jnp.int32), "budget": zeros(jnp.int32), "temperature": zeros(jnp.float32),
            "top_k": zeros(jnp.int32), "top_p": jnp.ones((slots,), jnp.float32), "min_p": zeros(jnp.float32),
            "seed": jnp.zeros((slots, 2), jnp.uint32), "stops": jnp.full((slots, max_stops), -1, jnp.int32),
            "forced": jnp.zeros((slots, max_forced), jnp.int32), "forced_len": zeros(jnp.int32),
            "allowed": jnp.ones((slots, config.vocab_size), bool)})


def pin(state: State) -> State:
    """The state with fixed shardings on a mesh (the cache as `CACHE_AXES` say, the rest replicated),
    so that every operation gets the layout the previous one returned (no recompilation)."""
    if jax.sharding.get_abstract_mesh().empty:
        return state
    rest = {name: jax.lax.with_sharding_constraint(value, jax.P()) for name, value in state.items() if name != "cache"}
    return {**rest, "cache": kv_cache.constrain(state["cache"])}


def _rows(tree: Any, fn: Any) -> Any:
    """Applies fn(leaf, batch axis) to every leaf of a cache."""
    return {kind: {name: fn(leaf, CACHE_AXES[name].index("cache_batch")) for name, leaf in leaves.items()}
            for kind, leaves in tree.items()}


def begin(state: State, slot: jax.Array, keep: jax.Array, settings: dict[str, jax.Array]) -> State:
    """The state with slot `slot` inactive, holding `settings` (rows of SETTINGS) and no cached
    position >= keep in its row (both kinds): a request's prefill then starts at `keep`."""
    state = dict(state)
    for name in SETTINGS:
        state[name] = state[name].at[slot].set(settings[name])
    state["active"] = state["active"].at[slot].set(False)
    state["count"] = state["count"].at[slot].set(0)

    def clear(leaf: jax.Array, axis: int) -> jax.Array:
        rows = jax.lax.broadcasted_iota(jnp.int32, leaf.shape, axis)
        return jnp.where((rows == slot) & (leaf >= keep), -1, leaf)

    cache = {kind: {**leaves, "positions": clear(leaves["positions"], CACHE_AXES["positions"].index("cache_batch"))}
             for kind, leaves in state["cache"].items()}
    state["cache"] = cache
    return pin(state)


def _next(state: State, logits: jax.Array) -> jax.Array:
    """Each slot's next token int32 [S] from logits [S, vocab]: forced, or sampled (masked)."""
    keys = jax.vmap(request_key)(state["seed"], state["count"])
    drawn = sample_rows(logits, keys, state["temperature"], state["top_k"], state["top_p"], state["min_p"],
                        state["allowed"])
    index = jnp.clip(state["count"], 0, state["forced"].shape[1] - 1)[:, None]
    forced = jnp.take_along_axis(state["forced"], index, axis=1)[:, 0]
    return jnp.where(state["count"] < state["forced_len"], forced, drawn)


def _after(state: State, made: jax.Array, emitted: jax.Array) -> State:
    """The state after rows `emitted` bool [S] made tokens `made` [S]: counts, stop checks."""
    state = dict(state)
    count = state["count"] + emitted
    stopped = jnp.any(made[:, None] == state["stops"], axis=1) | (count >= state["budget"])
    state["count"] = count
    state["tokens"] = jnp.where(emitted, made, state["tokens"])
    state["active"] = jnp.where(emitted, ~stopped, state["active"])
    return state


def _feed(state: State) -> tuple[jax.Array, jax.Array]:
    """A decode step's input: each active slot's last token at its position, [S, 1]; inactive slots
    all feed token 0 at position -1 (the same hidden state, so they route to the same few experts,
    and the MoE skips them: its cost follows the experts its valid tokens use)."""
    active = state["active"]
    return jnp.where(active, state["tokens"], 0)[:, None], jnp.where(active, state["positions"], -1)[:, None]


def _decoded(state: State, made: jax.Array) -> State:
    """The state after a decode step in which the active slots made `made` [S]."""
    active = state["active"]
    state = _after(state, made, active)
    state["positions"] = state["positions"] + active
    return state


def step(config: Config, params: Params, state: State, slots: jax.Array, tokens: jax.Array, starts: jax.Array,
         valid: jax.Array, last: jax.Array) -> tuple[State, jax.Array, jax.Array]:
    """One decode step of every active slot and one prompt chunk into each of R other slots, in one
    pass through the layers (`Transformer.extend_groups`: the expert weights and the unembedding
    are read once for both). slots int32 [R] (distinct, not decoding; `S`, out of range: a padding
    row), tokens int32 [R, C] (row r: its first valid[r] at positions starts[r], starts[r] + 1, ...).
    A row with `last` [R] (its prompt's last token is in this chunk) also makes its request's first
    token and starts decoding. Returns the state, the rows' first tokens int32 [R] (meaningful where
    `last`) and the decode step's tokens int32 [S] (-1: an inactive slot). Only the R rows of the
    cache are copied (gathered, run, scattered back into the donated cache)."""
    num_slots = state["tokens"].shape[0]
    rows_n, chunk = tokens.shape
    model = build(config, params)
    offsets = jnp.arange(chunk, dtype=jnp.int32)[None]
    positions = jnp.where(offsets < valid[:, None], starts[:, None] + offsets, -1)
    # a padding row reads the last slot's row (clipped) and writes nothing: its positions are all -1
    rows = _rows(state["cache"], lambda leaf, axis: jnp.take(leaf, slots, axis=axis, mode="clip"))
    (x_decode, cache), (x_prompt, rows) = model.extend_groups([(*_feed(state), state["cache"]),
                                                               (tokens, positions, rows)])
    sub = {name: jnp.take(value, slots, axis=0, mode="clip") for name, value in state.items() if name != "cache"}
    both = {name: jnp.concatenate([state[name], sub[name]]) for name in sub}
    hidden = jnp.concatenate([x_decode[:, 0], x_prompt[jnp.arange(rows_n), jnp.maximum(valid - 1, 0)]])  # [S + R, d]
    made = _next(both, model.logits(hidden, valid=jnp.concatenate([state["active"], last])))
    decoded = jnp.where(state["active"], made[:num_slots], -1)
    state = _decoded({**state, "cache": cache}, made[:num_slots])
    first = made[num_slots:]
    after = _after(sub, first, last)
    after["positions"] = jnp.where(last, starts + valid, sub["positions"])

    def put(leaf: jax.Array, row: jax.Array, axis: int) -> jax.Array:
        return leaf.at[(slice(None),) * axis + (slots,)].set(row, mode="drop")

    cache = {kind: {name: put(leaf, rows[kind][name], CACHE_AXES[name].index("cache_batch"))
                    for name, leaf in leaves.items()} for kind, leaves in cache.items()}
    state = {**{name: state[name].at[slots].set(after[name], mode="drop") for name in sub}, "cache": cache}
    return pin(state), first, decoded


def decode(config: Config, steps: int, params: Params, state: State, limit: jax.Array | None = None
           ) -> tuple[State, jax.Array]:
    """Up to min(`steps`, `limit`) decode steps of every active slot (`limit` int32, traced: one
    program for any dispatch length; None: `steps`), in one `while_loop` that ends early when no
    slot is active. Returns the state and the tokens made int32 [S, steps] (-1: none)."""
    slots = state["tokens"].shape[0]
    model = build(config, params)

    def running(carry: tuple) -> jax.Array:
        step, state, _ = carry
        return (step < (steps if limit is None else jnp.minimum(steps, limit))) & jnp.any(state["active"])

    def body(carry: tuple) -> tuple:
        step, state, out = carry
        active = state["active"]
        x, cache = extend(config, params, state["cache"], *_feed(state))
        state = {**state, "cache": cache}
        made = _next(state, model.logits(x[:, 0], valid=active))
        out = out.at[:, step].set(jnp.where(active, made, -1))
        return step + 1, _decoded(state, made), out

    out = jnp.full((slots, steps), -1, jnp.int32)
    _, state, out = jax.lax.while_loop(running, body, (jnp.int32(0), pin(state), out))
    return pin(state), out


def release(state: State, slot: jax.Array) -> State:
    """The state with slot `slot` no longer decoding (its cache row kept, for prefix reuse)."""
    return pin({**state, "active": state["active"].at[slot].set(False)})
