"""Generation: chunked prefill, a jitted decode step with a donated KV cache, sampling, and
`generate` / `stream_generate` over batches of prompts of different lengths.

Every jitted function here takes and returns pytrees (params, cache, tokens, keys); nothing is
mutated in place.

Shapes are bucketed (`_bucket`), so that new prompt lengths and token budgets rarely mean new
compilations: the cache and the decode loop's output buffer have a bucketed number of slots, and
the loop's step limit is a traced argument. On a mesh set with `jax.set_mesh`, the cache is made
directly in its sharding (`gptoss_jax.cache.CACHE_AXES`) and every step returns it in that sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import cache as kv_cache
from gptoss_jax.config import Config
from gptoss_jax.model import Params, build
from gptoss_jax.ops.bits import as_bits, value_dtype
from gptoss_jax.tokenizer import STOP_TOKENS


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy when temperature is 0; otherwise temperature, then top-k
    (0: off), top-p (1: off) and min-p (0: off) filters, as in transformers' warpers."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens int32 [b] from logits [b, vocab]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1 or sampling.min_p > 0:
        probs = jax.nn.softmax(logits, axis=-1)
        keep = jnp.ones_like(probs, bool)
        if sampling.min_p > 0:
            keep &= probs >= sampling.min_p * jnp.max(probs, axis=-1, keepdims=True)
        if sampling.top_p < 1:
            descending = -jnp.sort(-probs, axis=-1)
            before = jnp.cumsum(descending, axis=-1) - descending  # mass of strictly likelier tokens
            threshold = jnp.min(jnp.where(before < sampling.top_p, descending, jnp.inf), axis=-1, keepdims=True)
            keep &= probs >= threshold
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def extend(config: Config, params: Params, cache: kv_cache.Cache, tokens: jax.Array, positions: jax.Array
           ) -> tuple[jax.Array, kv_cache.Cache]:
    """Runs tokens [b, t] at positions [b, t] (negative: padding) through the model, attending to and
    writing the cache (donated). Returns the final normed hidden float32 [b, t, d] and the cache.
    On CPU pass a bfloat16 cache as its bits (`ops.bits.as_bits`, no copy), as `prefill` does: XLA:CPU
    would convert all of it to float32 in every step."""
    x, _, cache = build(config, params)(tokens, positions, cache)
    return x, kv_cache.constrain(cache)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: Config, params: Params, x: jax.Array) -> jax.Array:
    return build(config, params).logits(x)


def prefill(config: Config, params: Params, cache: kv_cache.Cache, prompts: np.ndarray, lengths: np.ndarray,
            chunk: int = 512) -> tuple[jax.Array, kv_cache.Cache]:
    """Writes right-padded prompts [b, L] (row i: lengths[i] tokens) into the cache in chunks of
    `chunk` tokens, so attention never builds an L x L matrix. Returns each row's last-token logits
    float32 [b, vocab] and the cache."""
    params, cache = as_bits(params), as_bits(cache)  # no copies; see `gptoss_jax.ops.bits`
    b, length = prompts.shape
    chunk = min(chunk, length)
    steps = -(-length // chunk)
    padded = np.zeros((b, steps * chunk), np.int32)
    padded[:, :length] = prompts
    positions = np.arange(steps * chunk, dtype=np.int32)[None].repeat(b, 0)
    positions = np.where(positions < lengths[:, None], positions, -1)
    last = np.zeros((b, config.hidden), np.float32)
    last = jnp.asarray(last)
    for step in range(steps):
        window = slice(step * chunk, (step + 1) * chunk)
        x, cache = extend(config, params, cache, jnp.asarray(padded[:, window]), jnp.asarray(positions[:, window]))
        in_chunk = (lengths - 1 >= window.start) & (lengths - 1 < window.stop)
        index = np.clip(lengths - 1 - window.start, 0, chunk - 1)
        last = jnp.where(jnp.asarray(in_chunk)[:, None], x[jnp.arange(b), jnp.asarray(index)], last)
    return _logits(config, params, last), cache


def _next_tokens(config: Config, sampling: Sampling, params: Params, cache: kv_cache.Cache, tokens: jax.Array,
                 positions: jax.Array, key: jax.Array) -> tuple[jax.Array, kv_cache.Cache]:
    """One decode step: tokens [b] at positions [b] -> sampled next tokens [b] and the cache."""
    model = build(config, params)
    x, _, cache = model(tokens[:, None], positions[:, None], cache)
    return sample(model.logits(x[:, 0]), key, sampling), kv_cache.constrain(cache)


decode_step = jax.jit(_next_tokens, static_argnums=(0, 1), donate_argnums=3)
"""`decode_step(config, sampling, params, cache, tokens [b], positions [b], key) -> (next [b], cache)`."""


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=4)
def _decode_loop(config: Config, sampling: Sampling, max_new_tokens: jax.Array | int, params: Params,
                 cache: kv_cache.Cache, first: jax.Array, lengths: jax.Array, key: jax.Array, stop_tokens: jax.Array
                 ) -> tuple[jax.Array, jax.Array, kv_cache.Cache]:
    """The whole generation after the first token in one `jax.lax.while_loop`.

    `max_new_tokens` (int32 scalar, traced: one compilation per cache shape) must be at most the
    full-attention layers' slots, `s`, which sizes the output buffer. Returns tokens int32 [b, s]
    (row i: its first count[i] entries, the rest 0), the number generated per row count [b] (stop
    token included) and the cache (returned so that the donated one is updated in place).
    """
    b = first.shape[0]
    out = jnp.zeros((b, _output_slots(cache)), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_tokens)
    count = jnp.ones((b,), jnp.int32)

    def running(state: tuple) -> jax.Array:
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, cache, out, done, count = state
        tokens, cache = _next_tokens(config, sampling, params, cache, out[:, step - 1], lengths + step - 1,
                                     jax.random.fold_in(key, step))
        out = out.at[:, step].set(jnp.where(done, 0, tokens))
        count = count + ~done
        done = done | jnp.isin(tokens, stop_tokens)
        return step + 1, cache, out, done, count

    _, cache, out, _, count = jax.lax.while_loop(running, body, (jnp.int32(1), cache, out, done, count))
    return out, count, cache


def _output_slots(cache: kv_cache.Cache) -> int:
    """`_decode_loop`'s output buffer length: the full-attention slots (a bucket >= prompt + new)."""
    return cache["full"]["positions"].shape[1]


@dataclasses.dataclass(frozen=True)
class _Request:
    prompts: np.ndarray  # [b, L] right-padded
    lengths: np.ndarray  # [b]
    max_len: int
    stop_tokens: np.ndarray


BUCKET_POWERS_UP_TO = 4096
"""`_bucket` rounds lengths up to a power of two up to here, and to a multiple of `BUCKET_STEP` above."""
BUCKET_STEP = 2048


def _bucket(n: int, limit: int | None = None) -> int:
    """A length >= n from few possible values, so that shapes rarely change: the next power of two
    (at least 16) up to 4096, then the next multiple of 2048 (a 16385-token cache takes 18432
    slots, not 32768); at most `limit` (the context length) when given."""
    if int(n) != n or n < 1:
        raise ValueError(f"a length to bucket must be an integer >= 1, got {n}")
    if n <= BUCKET_POWERS_UP_TO:
        size = max(16, 1 << (int(n) - 1).bit_length())
    else:
        size = -(-int(n) // BUCKET_STEP) * BUCKET_STEP
    return size if limit is None else min(size, limit)


def _validate(config: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              stop_tokens: Sequence[int] | None) -> _Request:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    rows = []
    for i, prompt in enumerate(prompts):
        row = np.asarray(prompt)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids")
        if not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompt {i} holds non-integer values ({row.dtype}); pass token ids")
        bad = (row < 0) | (row >= config.vocab_size)
        if bad.any():
            raise ValueError(f"prompt {i}: token id {int(row[bad][0])} at index {int(np.argmax(bad))} is outside "
                             f"the vocabulary [0, {config.vocab_size})")
        rows.append(row.astype(np.int32))
    lengths = np.array([len(r) for r in rows], np.int32)
    max_len = int(lengths.max()) + int(max_new_tokens)
    if max_len > config.max_positions:
        raise ValueError(f"prompt of {lengths.max()} tokens + {max_new_tokens} new tokens exceeds the context "
                         f"of {config.max_positions} positions")
    # Shapes rounded up to buckets, so that new lengths rarely mean new compilations.
    max_len = _bucket(max_len, config.max_positions)
    padded = np.zeros((len(rows), _bucket(int(lengths.max()), config.max_positions)), np.int32)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    stops = np.asarray(STOP_TOKENS if stop_tokens is None else list(stop_tokens), np.int32).reshape(-1)
    return _Request(padded, lengths, max_len, stops if stops.size else np.array([-1], np.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def empty_cache(config: Config, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> kv_cache.Cache:
    """`init_cache(config, batch, max_len, dtype)`, made directly in its sharding (each device
    fills only its shards) when a `gptoss_jax.sharding` mesh is set with `jax.set_mesh`."""
    return kv_cache.constrain(kv_cache.init_cache(config, batch, max_len, dtype))


def _start(config: Config, params: Params, request: _Request, sampling: Sampling, key: jax.Array,
           prefill_chunk: int) -> tuple[jax.Array, kv_cache.Cache]:
    """Prefills the request's prompts into a new cache: (first sampled tokens [b], the cache)."""
    cache = empty_cache(config, len(request.lengths), request.max_len, value_dtype(params["embed"]))
    logits, cache = prefill(config, params, cache, request.prompts, request.lengths, prefill_chunk)
    return sample(logits, jax.random.fold_in(key, 0), sampling), cache


def generate(config: Config, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, prefill_chunk: int = 512) -> list[list[int]]:
    """Generated token ids per prompt (prompt excluded; a row ends with its stop token, if it met one).

    `prompts` is a list of token-id lists of any lengths. Each row stops on its own at a token of
    `stop_tokens` (default `<|return|>`, `<|call|>`, `<|endoftext|>`) or after `max_new_tokens`.
    The same seed gives the same output.
    """
    sampling = Sampling(temperature, top_k, top_p, min_p)
    request = _validate(config, prompts, max_new_tokens, stop_tokens)
    key = jax.random.key(seed)
    params = as_bits(params)  # no copy; see `gptoss_jax.ops.bits`
    first, cache = _start(config, params, request, sampling, key, prefill_chunk)
    out, count, _ = _decode_loop(config, sampling, jnp.int32(max_new_tokens), params, cache, first,
                                 jnp.asarray(request.lengths), key, jnp.asarray(request.stop_tokens))
    out, count = np.asarray(out), np.asarray(count)
    return [out[i, : count[i]].tolist() for i in range(len(count))]


def stream_generate(config: Config, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                    *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    seed: int = 0, stop_tokens: Sequence[int] | None = None, prefill_chunk: int = 512
                    ) -> Iterator[list[int | None]]:
    """Like `generate`, but yields one step at a time: a list with each row's new token, or None for
    rows that have already stopped. Gives the same tokens as `generate` for the same arguments."""
    sampling = Sampling(temperature, top_k, top_p, min_p)
    request = _validate(config, prompts, max_new_tokens, stop_tokens)
    key = jax.random.key(seed)
    params = as_bits(params)  # no copy; see `gptoss_jax.ops.bits`
    tokens, cache = _start(config, params, request, sampling, key, prefill_chunk)
    done = np.zeros(len(request.lengths), bool)
    stops = set(request.stop_tokens.tolist())
    for step in range(int(max_new_tokens)):
        if step:
            tokens, cache = decode_step(config, sampling, params, cache, tokens,
                                        jnp.asarray(request.lengths + step - 1), jax.random.fold_in(key, step))
        host = np.asarray(tokens)
        yield [None if done[i] else int(t) for i, t in enumerate(host)]
        done |= np.isin(host, list(stops))
        if done.all():
            return

