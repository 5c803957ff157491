"""Decoding against the full forward pass and against transformers' greedy `generate`; shape
buckets and compilation reuse; the KV cache's sharding on a mesh."""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to_reference

import gptoss_jax
from gptoss_jax import cache as kv_cache
from gptoss_jax.ops.bits import as_bits
from gptoss_jax.ops.parallel import param_shardings
from gptoss_jax.generate import (
    Sampling,
    _bucket,
    _decode_loop,
    _logits,
    _start,
    _validate,
    decode_step,
    extend,
    generate,
    sample,
    stream_generate,
)


def test_cached_decode_equals_full_forward_at_every_step(golden):
    """Chunked prefill (chunks shorter than the window), then one token at a time, across the
    sliding window several times: every step's logits equal the full forward's at that position."""
    config, tokens = golden.config, golden.outputs["tokens"]
    params = golden.params(np.float32)
    full = np.asarray(gptoss_jax.forward(config, params, tokens))
    b, t = tokens.shape
    assert t >= 3 * config.sliding_window
    cache = kv_cache.init_cache(config, b, t, jnp.float32)
    assert cache["sliding"]["k"].shape[3] == config.sliding_window  # ring buffer, not t
    positions = np.arange(t, dtype=np.int32)[None].repeat(b, 0)
    prompt = 7
    for start in range(0, prompt, 3):  # prefill chunks of 3 (the last one partly padding)
        stop = min(start + 3, prompt)
        chunk = np.zeros((b, 3), np.int32)
        chunk_positions = np.full((b, 3), -1, np.int32)
        chunk[:, : stop - start] = tokens[:, start:stop]
        chunk_positions[:, : stop - start] = positions[:, start:stop]
        x, cache = extend(config, params, cache, jnp.asarray(chunk), jnp.asarray(chunk_positions))
        assert_close_to_reference(_logits(config, params, x)[:, : stop - start], full[:, start:stop],
                                  f"{golden.name} prefill chunk at {start}")
    for step in range(prompt, t):
        x, cache = extend(config, params, cache, jnp.asarray(tokens[:, step:step + 1]),
                          jnp.asarray(positions[:, step:step + 1]))
        assert_close_to_reference(_logits(config, params, x[:, 0]), full[:, step], f"{golden.name} decode step {step}")


def test_groups_through_the_layers_together_equal_each_alone(tiny):
    """`Transformer.extend_groups`: a decode batch (2 rows, one of them padding, after 15 tokens) and
    a prompt chunk (1 row of 14 tokens) with their own caches (both past the sliding window of 12),
    in one pass, give each group's hidden states and cache as its own pass does."""
    config, params = tiny
    rng = np.random.default_rng(3)
    decode_cache = kv_cache.init_cache(config, 2, 32, jnp.float32)
    history = rng.integers(0, config.vocab_size, (2, 15)).astype(np.int32)
    _, decode_cache = extend(config, params, decode_cache, jnp.asarray(history),
                             jnp.asarray(np.arange(15, dtype=np.int32)[None].repeat(2, 0)))
    chunk_cache = kv_cache.init_cache(config, 1, 32, jnp.float32)
    groups = [(jnp.asarray(rng.integers(0, config.vocab_size, (2, 1)).astype(np.int32)),
               jnp.asarray([[15], [-1]], jnp.int32), decode_cache),
              (jnp.asarray(rng.integers(0, config.vocab_size, (1, 14)).astype(np.int32)),
               jnp.asarray(np.arange(14, dtype=np.int32)[None]), chunk_cache)]
    assert 14 > config.sliding_window
    together = jax.jit(lambda groups: gptoss_jax.model.build(config, params).extend_groups(groups))(groups)
    for (x, cache), (tokens, positions, own_cache) in zip(together, groups):
        x_alone, cache_alone = extend(config, params, jax.tree.map(jnp.copy, own_cache), tokens, positions)
        valid = np.asarray(positions) >= 0
        np.testing.assert_allclose(np.asarray(x)[valid], np.asarray(x_alone)[valid], rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_alone)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_transformers(golden):
    ref = golden.outputs
    assert ref["prompt"].shape[1] > golden.config.sliding_window and ref["greedy"].shape[1] >= 64
    out = generate(golden.config, golden.params(np.float32), ref["prompt"].tolist(),
                   max_new_tokens=ref["greedy"].shape[1], stop_tokens=[])
    np.testing.assert_array_equal(np.array(out), ref["greedy"])
    np.testing.assert_array_equal(ref["greedy"], ref["greedy_nocache"])


@pytest.fixture(scope="module")
def tiny():
    config = gptoss_jax.load_config("tiny-a")
    return config, gptoss_jax.init_params(config, seed=3, dtype=jnp.float32)


def test_prompts_of_different_lengths_equal_one_at_a_time(tiny):
    config, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 31, 17)]
    batched = generate(config, params, prompts, max_new_tokens=20, stop_tokens=[], prefill_chunk=8)
    for prompt, row in zip(prompts, batched):
        assert generate(config, params, [prompt], max_new_tokens=20, stop_tokens=[]) == [row]


def test_each_row_stops_on_its_own_stop_token(tiny):
    """Two stop tokens, each met first by one row, at different steps: each row ends with its own, the
    other keeps going; after its stop a row gets padding (0, not counted) in the decode loop's output
    and None from stream_generate, and the loop ends when the last row stops."""
    config, params = tiny
    prompts, new = [[1, 2, 3], [7, 8, 9, 10, 11]], 40  # a 64-slot cache, as in the budget test below
    free = generate(config, params, prompts, new, stop_tokens=[])

    def first_meets(row, token):
        return free[row].index(token) if token in free[row] else new

    # row 1 stops first (at step j1), row 0 later (j0): each at the first step its stop token comes
    pairs = [(j0, j1) for j1 in range(1, 8) for j0 in range(j1 + 2, 12)
             if first_meets(1, free[0][j0]) > j1 and first_meets(0, free[1][j1]) > j0
             and free[0].index(free[0][j0]) == j0 and free[1].index(free[1][j1]) == j1]
    assert pairs, f"no two stop tokens that each row meets on its own: {free}"
    j0, j1 = pairs[0]
    stops = [free[0][j0], free[1][j1]]
    stopped = generate(config, params, prompts, new, stop_tokens=stops)
    assert stopped == [free[0][: j0 + 1], free[1][: j1 + 1]], (stops, j0, j1)
    assert [row[-1] for row in stopped] == stops and [len(row) for row in stopped] == [j0 + 1, j1 + 1]

    request = _validate(config, prompts, new, stops)
    key, params = jax.random.key(0), as_bits(params)
    first, cache = _start(config, params, request, Sampling(), key, prefill_chunk=512)
    out, count, _ = _decode_loop(config, Sampling(), jnp.int32(new), params, cache, first,
                                 jnp.asarray(request.lengths), key, jnp.asarray(request.stop_tokens))
    out, count = np.asarray(out), np.asarray(count)
    assert count.tolist() == [j0 + 1, j1 + 1]
    assert out[0, : j0 + 1].tolist() == stopped[0] and out[1, : j1 + 1].tolist() == stopped[1]
    assert not out[0, j0 + 1:].any() and not out[1, j1 + 1:].any(), "tokens after a row's stop"

    steps = list(stream_generate(config, params, prompts, new, stop_tokens=stops))
    assert len(steps) == j0 + 1, "stream_generate did not end when the last row stopped"
    assert [step[1] for step in steps] == stopped[1] + [None] * (j0 - j1)
    assert [step[0] for step in steps] == stopped[0]


def test_sampling_is_seeded_and_filters_work(tiny):
    config, params = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    greedy = generate(config, params, prompts, 16, stop_tokens=[])
    hot = dict(max_new_tokens=16, stop_tokens=[], temperature=1.5)
    a = generate(config, params, prompts, seed=1, **hot)
    assert a == generate(config, params, prompts, seed=1, **hot)
    assert a != generate(config, params, prompts, seed=2, **hot)
    assert a != greedy
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        assert generate(config, params, prompts, seed=4, **hot, **narrow) == greedy, narrow


def test_sample_filters_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def drawn(**kw):
        return set(np.asarray(jax.vmap(lambda k: sample(logits, k, Sampling(1.0, **kw)))(keys)).ravel())

    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.7) == {0, 1}      # 0.5 < 0.7, then 0.8 >= 0.7: two tokens
    assert drawn(min_p=0.25) == {0, 1, 2}  # >= 0.25 * 0.5
    assert drawn() == {0, 1, 2, 3}


def test_streaming_equals_generate(tiny):
    config, params = tiny
    prompts = [[1, 2, 3, 4, 5, 6], [40, 41]]
    kwargs = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=7, stop_tokens=[])
    steps = list(stream_generate(config, params, prompts, **kwargs))
    assert [[s[i] for s in steps] for i in range(2)] == generate(config, params, prompts, **kwargs)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "non-empty"),
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], [3, 400]], {}, r"prompt 1: token id 400 at index 1 is outside the vocabulary \[0, 301\)"),
    ([[-1]], {}, "outside the vocabulary"),
    ([[1] * 500], {"max_new_tokens": 20}, "exceeds the context of 512"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"temperature": -1}, "temperature"),
    ([[1]], {"top_p": 0}, "top_p"),
    ([[1]], {"min_p": 1.0}, "min_p"),
    ([[1]], {"top_k": -3}, "top_k"),
    ([[1.5]], {}, "non-integer"),
])
def test_bad_requests_get_clear_errors(tiny, prompts, kwargs, message):
    config, params = tiny
    with pytest.raises(ValueError, match=message):
        generate(config, params, prompts, **kwargs)


def test_generation_on_a_mesh_equals_one_device():
    from gptoss_jax.sharding import make_mesh

    config = gptoss_jax.load_config("tiny-ep")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 10, 11]]
    params = gptoss_jax.init_params(config, 0, jnp.float32)
    expected = generate(config, params, prompts, 12, stop_tokens=[])
    mesh = make_mesh("expert=4,tensor=2")
    params = jax.device_put(params, param_shardings(config, mesh))  # (sharded init: tests/test_sharding.py)
    with jax.set_mesh(mesh):
        assert generate(config, params, prompts, 12, stop_tokens=[]) == expected


def test_bucket_sizes():
    """Powers of two (at least 16) up to 4096, then multiples of 2048, capped by the context."""
    cases = {1: 16, 16: 16, 17: 32, 100: 128, 2049: 4096, 4096: 4096, 4097: 6144, 6144: 6144, 6145: 8192,
             16384: 16384, 16385: 18432, 100_000: 100_352, 131_072: 131_072}
    assert {n: _bucket(n) for n in cases} == cases
    assert _bucket(16385, limit=17000) == 17000 and _bucket(17, limit=512) == 32
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="integer >= 1"):
            _bucket(bad)


def test_request_shapes_use_the_buckets():
    """A 16k-token request gets an 18432-slot cache (not 32768); both shapes stop at the context."""
    config = dataclasses.replace(gptoss_jax.load_config("tiny-a"), max_positions=20_000)
    request = _validate(config, [[1] * 16_000, [2] * 9_000], 385, [])
    assert request.max_len == 18_432 and request.prompts.shape == (2, 16_384)
    assert request.lengths.tolist() == [16_000, 9_000] and not request.prompts[1, 9_000:].any()
    near_the_end = _validate(config, [[1] * 19_000], 1000, [])
    assert near_the_end.max_len == 20_000 and near_the_end.prompts.shape == (1, 20_000)
    assert _validate(config, [[1] * 5], 40, []).max_len == 64


def test_new_token_budgets_share_one_compilation(tiny):
    """max_new_tokens is traced and the output buffer bucketed: 40 and 50 new tokens after prompts
    of 5 and 3 tokens (one 64-slot cache) reuse one compiled decode loop, with the same tokens."""
    config, params = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    forty = generate(config, params, prompts, 40, stop_tokens=[])
    compiled = _decode_loop._cache_size()
    fifty = generate(config, params, prompts, 50, stop_tokens=[])
    assert _decode_loop._cache_size() == compiled, "a new max_new_tokens recompiled the decode loop"
    assert [len(row) for row in forty] == [40, 40] and [len(row) for row in fifty] == [50, 50]
    assert [row[:40] for row in fifty] == forty
    steps = list(stream_generate(config, params, prompts, 50, stop_tokens=[]))
    assert [[step[i] for step in steps] for i in range(2)] == fifty


def _assert_cache_sharded(cache, mesh, expected, what):
    for kind, leaves in cache.items():
        for name, leaf in leaves.items():
            want = jax.sharding.NamedSharding(mesh, expected[name])
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (what, kind, name, leaf.sharding.spec)


def _cache_gather_shapes(cache: kv_cache.Cache) -> dict[tuple[int, ...], str]:
    """{dims: leaf} of every array an all-gather of a cache leaf (sharded) can produce: each dim from
    its shard's size up to the full one, the shard itself excluded; k and v also as one layer's
    slice [(1,) b, kv_heads, slots, head_dim] (inside the scan over layer pairs)."""
    found = {}
    for kind, leaves in cache.items():
        for name, leaf in leaves.items():
            local, what = leaf.sharding.shard_shape(leaf.shape), f"{kind}/{'k|v' if name in ('k', 'v') else name}"
            options = [[n // k for k in range(1, n // m + 1) if (n // m) % k == 0] for n, m in zip(leaf.shape, local)]
            for dims in itertools.product(*options):
                if dims != tuple(local):
                    found.setdefault(dims, what)
                    if name != "positions":
                        found.setdefault(dims[1:], f"{what} (one layer)")
                        found.setdefault((1, *dims[1:]), f"{what} (one layer)")
    return found


def _cache_all_gathers(hlo: str, cache: kv_cache.Cache) -> list[str]:
    """The all-gathers in `hlo` of cache-shaped arrays (see `_cache_gather_shapes`) or of any array
    with a dim of some kind's slot count (the full layers' max_len, the sliding layers' ring)."""
    shapes = _cache_gather_shapes(cache)
    slots = {kind: leaves["positions"].shape[1] for kind, leaves in cache.items()}
    found = []
    for match in re.finditer(r"= (\([^=]*?\)|\S+) all-gather(?:-start)?\(", hlo):
        for part in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
            dims = tuple(int(x) for x in part.split(",") if x)
            kinds = [kind for kind, n in slots.items() if n in dims]
            if dims in shapes or kinds:
                found.append(f"{list(dims)} ({shapes.get(dims) or ', '.join(kinds) + ' slots'})")
    return found


def test_cache_all_gather_check_sees_both_kinds():
    """The check below knows the gathered shapes of both kinds' caches, the sliding layers' ring too."""
    from gptoss_jax.sharding import cache_specs, make_mesh

    config, mesh = gptoss_jax.load_config("tiny-ep"), make_mesh("data=2,tensor=2", devices=jax.devices()[:4])
    cache = kv_cache.init_cache(config, 2, 64, jnp.float32)
    cache = jax.device_put(cache, jax.tree.map(lambda spec: jax.NamedSharding(mesh, spec), cache_specs(cache, mesh),
                                               is_leaf=lambda x: isinstance(x, jax.P)))
    shapes = _cache_gather_shapes(cache)
    window = config.sliding_window
    assert shapes[(2, 2, 2, window, 6)] == "sliding/k|v" and shapes[(1, 2, 2, window, 6)] == "sliding/k|v (one layer)"
    assert shapes[(2, window)] == "sliding/positions" and shapes[(2, 2, 2, 64, 6)] == "full/k|v"
    assert (2, 1, 1, window, 6) not in shapes and (1, 64) not in shapes  # the shards themselves
    hlo = f"%a = f32[2,2,{window},6]{{3,2,1,0}} all-gather(f32[1,1,{window},6] %x)\n" \
          f"%b = (f32[8,{window}]{{1,0}}, s32[3]{{0}}) all-gather(%y, %z)\n%c = f32[2,6]{{1,0}} all-gather(%w)"
    assert _cache_all_gathers(hlo, cache) == [f"[2, 2, {window}, 6] (sliding/k|v (one layer))",
                                              f"[8, {window}] (sliding slots)"]


@pytest.mark.parametrize("spec, devices", [("data=2,tensor=2", 4), ("data=2,expert=2,tensor=2", 8)])
def test_cache_is_sharded_on_a_mesh(spec, devices):
    """The cache is made in its sharding (batch over data, KV heads over tensor), keeps it through
    prefill, the decode loop and a decode step, is never all-gathered, holds 1 / (data x tensor) of
    its bytes per device, and the tokens equal one device's."""
    from gptoss_jax.sharding import make_mesh

    config = gptoss_jax.load_config("tiny-ep")  # 2 KV heads
    prompts, new = [[1, 2, 3, 4, 5, 6, 7], [9, 10, 11]], 30  # a 64-slot cache; batch 2: not split over expert
    params = gptoss_jax.init_params(config, 0, jnp.float32)
    expected_tokens = generate(config, params, prompts, new, stop_tokens=[])
    mesh = make_mesh(spec, devices=jax.devices()[:devices])
    params = jax.device_put(params, param_shardings(config, mesh))
    layout = {"k": jax.P(None, "data", "tensor", None, None), "v": jax.P(None, "data", "tensor", None, None),
              "positions": jax.P("data", None)}
    sampling, key = Sampling(), jax.random.key(0)
    with jax.set_mesh(mesh):
        request = _validate(config, prompts, new, [])
        first, cache = _start(config, params, request, sampling, key, prefill_chunk=4)
        _assert_cache_sharded(cache, mesh, layout, "after prefill")
        device = mesh.devices.flat[0]
        for kind, leaves in cache.items():
            for name, leaf in leaves.items():
                local = sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
                assert local == leaf.nbytes // (4 if name in ("k", "v") else 2), (spec, kind, name, local, leaf.nbytes)
        args = (params, cache, first, jnp.asarray(request.lengths), key, jnp.asarray(request.stop_tokens))
        loop = _decode_loop.lower(config, sampling, jnp.int32(new), *args).compile()
        gathered = _cache_all_gathers(loop.as_text(), cache)
        assert not gathered, f"{spec}: the decode loop all-gathers cache-sized arrays {gathered}"
        out, count, cache = loop(jnp.int32(new), *args)
        _assert_cache_sharded(cache, mesh, layout, "after the decode loop")
        assert [out[i, :c].tolist() for i, c in enumerate(np.asarray(count))] == expected_tokens
        if devices == 8:
            _, cache = decode_step(config, sampling, params, cache, first, jnp.asarray(request.lengths + new), key)
            _assert_cache_sharded(cache, mesh, layout, "after a decode step")
