"""Per-row sampling with per-row settings as arrays: one compiled program for any mix of requests.

The filters are `generate.sample`'s (temperature, then top-k, then min-p and top-p on the
probabilities after top-k), evaluated with traced per-row values; rows with temperature 0 take
the exact argmax. Each row draws with its own key, so a row's token never depends on the others.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def request_key(seed_words: jax.Array, index: jax.Array) -> jax.Array:
    """The key of token `index` of a request: fold_in(key(seed), index); seed_words uint32 [2] are
    the seed's (high, low) words, so that key(seed) == `jax.random.key(seed)` for seeds < 2**32."""
    return jax.random.fold_in(jax.random.wrap_key_data(seed_words), index)


def _filtered(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
              min_p: jax.Array) -> jax.Array:
    """logits float32 [b, v] after temperature and each row's top-k / top-p / min-p filters."""
    vocab = logits.shape[-1]
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def top_k_top_p(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        descending = -jnp.sort(-logits, axis=-1)
        kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
        logits = jnp.where((top_k[:, None] > 0) & (logits < kth), -jnp.inf, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_probs = -jnp.sort(-probs, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly likelier tokens
        threshold = jnp.min(jnp.where(before < top_p[:, None], sorted_probs, jnp.inf), axis=-1, keepdims=True)
        return logits, (top_p[:, None] >= 1) | (probs >= threshold)

    needs_sort = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1)))
    logits, keep = jax.lax.cond(needs_sort, top_k_top_p, lambda x: (x, jnp.ones(x.shape, bool)), logits)
    probs = jax.nn.softmax(logits, axis=-1)
    keep &= (min_p[:, None] <= 0) | (probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True))
    return jnp.where(keep, logits, -jnp.inf)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                min_p: jax.Array, allowed: jax.Array | None = None) -> jax.Array:
    """Next tokens int32 [b] from logits [b, v], keys [b] (typed), per-row settings [b] and an
    optional mask of allowed tokens bool [b, v] (applied first, greedy rows included)."""
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def drawn(logits: jax.Array) -> jax.Array:
        filtered = _filtered(logits, temperature, top_k, top_p, min_p)
        draw = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, filtered)
        return jnp.where(temperature > 0, draw.astype(jnp.int32), greedy)

    # all rows greedy: no filters and no random draws over the vocabulary
    return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda _: greedy, logits)
