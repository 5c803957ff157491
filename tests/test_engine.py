"""The continuous-batching engine, on an expert=2,tensor=2 mesh, against `generate` run on each request
alone on one device: greedy tokens equal, seeded sampling the same and independent of the other
slots, nothing compiled after warm-up, slots freed by finishing and cancelling, prefix reuse,
refusals, forced tokens and allowed masks, streaming from the background loop."""

import asyncio
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

import gptoss_jax
from gptoss_jax.engine import Engine, Refused, RequestSettings

_LOWERINGS = []
monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _LOWERINGS.append(name) if name == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)


@contextlib.contextmanager
def nothing_compiles():
    """Fails if any program in the process is lowered (compiled or read from the disk cache) inside."""
    before = len(_LOWERINGS)
    yield
    assert len(_LOWERINGS) == before, f"{len(_LOWERINGS) - before} programs compiled after warm-up"


@pytest.fixture(scope="module")
def tiny():
    config = gptoss_jax.load_config("tiny-ep")  # sliding window 5: prompts of 25..32 tokens wrap its ring 5 times
    return config, gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def engine(tiny):
    """The engine every test shares, on an expert=2,tensor=2 mesh: each test compares it with
    `generate` on one device (the single-device engine: tests/test_engine_multihost.py)."""
    from gptoss_jax.sharding import make_mesh

    from gptoss_jax.ops.parallel import param_shardings

    config, params = tiny
    mesh = make_mesh("expert=2,tensor=2", devices=jax.devices()[:4])
    params = jax.device_put(params, param_shardings(config, mesh))  # no compilation (init_params(mesh=): 6 s)
    with jax.set_mesh(mesh):
        engine = Engine(config, params, slots=4, max_context=128, prefill_chunk=16, steps_per_dispatch=4,
                        max_queue=6, max_stop_tokens=4, max_forced_tokens=8)
    engine.warmup()
    assert engine._state["cache"]["full"]["k"].sharding.mesh.shape == mesh.shape  # it runs on the mesh
    return engine


@pytest.fixture(scope="module")
def prompts(tiny):
    rng = np.random.default_rng(1)
    return [rng.integers(0, tiny[0].vocab_size, n).tolist() for n in (25, 32, 29, 27, 31, 26)]


_REFERENCE = {}


def alone(tiny, prompt, new, **kwargs):
    """`generate` of one prompt alone, stop tokens off (memoized)."""
    key = (tuple(prompt), new, tuple(sorted(kwargs.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = gptoss_jax.generate(*tiny, [prompt], max_new_tokens=new, stop_tokens=[], **kwargs)[0]
    return _REFERENCE[key]


def greedy(n, **kwargs):
    return RequestSettings(max_tokens=n, stop_tokens=(), **kwargs)


HOT = dict(temperature=0.9, top_k=40, top_p=0.9, seed=5)


def test_requests_arriving_over_time_equal_generate_alone(engine, tiny, prompts):
    """Six greedy requests (more than the slots), of different lengths and budgets, submitted between
    steps, one with a stop token it meets and one of a single token: each gets what `generate` gives it alone."""
    budgets = [20, 30, 9, 25, 1, 16]
    refs = [alone(tiny, p, 30) for p in prompts]
    stop = refs[3][7]  # request 3 stops at the first place it makes this token
    settings = [greedy(n) for n in budgets]
    settings[3] = RequestSettings(max_tokens=25, stop_tokens=(stop,))
    before = engine.stats()
    with nothing_compiles():
        handles = [engine.submit(prompts[i], settings[i]) for i in range(3)]
        engine.step()
        handles.append(engine.submit(prompts[3], settings[3]))
        for _ in range(3):
            engine.step()
        handles += [engine.submit(p, s) for p, s in zip(prompts[4:], settings[4:])]
        assert engine.stats()["queue_length"] >= 1  # more requests than slots: some wait
        engine.run_until_idle()
    for i, (handle, n) in enumerate(zip(handles, budgets)):
        expected = refs[i][:n] if i != 3 else refs[3][: refs[3].index(stop) + 1]
        assert handle.result(timeout=0) == expected, f"request {i}"
        assert handle.finish_reason == ("stop" if i == 3 else "length"), i
    stats = engine.stats()
    assert stats["slots_in_use"] == 0 and stats["queue_length"] == 0
    assert stats["finished"] - before["finished"] == 6
    assert stats["generated_tokens"] - before["generated_tokens"] == sum(len(h.generated) for h in handles)
    assert stats["compilations_after_warmup"] == 0


def _slot_of(engine, handle):
    return next(i for i, s in enumerate(engine._slots) if s.request and s.request.handle is handle)


def test_seeded_sampling_is_the_same_alone_together_and_in_another_slot(engine, tiny, prompts):
    """A seeded sampled request gives the same tokens alone (those `generate` gives with that seed on
    one device: token i is drawn with fold_in(key(seed), i) in both), and among other sampled and
    greedy requests in another slot; another seed gives other tokens."""
    prompt = prompts[2]
    with nothing_compiles():
        solo = engine.submit(prompt, greedy(24, **HOT))
        engine.step()
        solo_slot = _slot_of(engine, solo)
        engine.run_until_idle()
        # the others take the least recently used slots (not solo's), then `again` takes the last of those
        others = [engine.submit(prompts[0], greedy(20, temperature=1.3, seed=0, min_p=0.05)),
                  engine.submit(prompts[3], greedy(12))]
        engine.step()
        again = engine.submit(prompt, greedy(24, **HOT))
        engine.step()
        again_slot = _slot_of(engine, again)
        other_seed = engine.submit(prompt, greedy(24, **{**HOT, "seed": 6}))
        engine.run_until_idle()
    assert solo.result() == again.result() and len(solo.generated) == 24
    assert solo_slot != again_slot
    assert other_seed.result() != solo.generated
    assert solo.generated == alone(tiny, prompt, 24, **HOT)
    assert others[1].result() == alone(tiny, prompts[3], 30)[:12]


def test_constraints_forced_tokens_then_an_allowed_set(engine, tiny, prompts):
    """Forced tokens come first (as if sampled: the rest continues the prompt + them, greedy); every
    sampled token is in the allowed set, greedy and sampled; the unconstrained greedy run leaves it."""
    config, _ = tiny
    prompt, forced = prompts[0][:24], (7, 99, 3)
    allowed = (5, 17, 60, 61, 120)
    with nothing_compiles():
        after_forced = engine.submit(prompt, greedy(10, forced_tokens=forced))
        masked = engine.submit(prompt, greedy(15, allowed_tokens=allowed))
        masked_hot = engine.submit(prompt, greedy(15, allowed_tokens=allowed, temperature=2.0, seed=3))
        both = engine.submit(prompt, greedy(12, forced_tokens=forced[:2], allowed_tokens=allowed))
        engine.run_until_idle()
    assert after_forced.generated[:3] == list(forced)
    assert after_forced.generated[3:] == alone(tiny, prompt + list(forced), 30)[:7]
    assert set(masked.generated) <= set(allowed) and set(masked_hot.generated) <= set(allowed)
    assert len(set(masked_hot.generated)) > 1
    assert both.generated[:2] == list(forced[:2]) and set(both.generated[2:]) <= set(allowed)
    assert not set(alone(tiny, prompt, 30)[:15]) <= set(allowed)  # the mask changed something


def test_cancelled_and_finished_requests_free_their_slots(engine, prompts):
    """Cancelling a decoding, a prefilling and a queued request frees their slots (the engine's
    counters); a waiting request takes a freed slot at the next step."""
    before = engine.stats()
    with nothing_compiles():
        handles = [engine.submit(prompts[i % 6], greedy(60), request_id=f"c{i}") for i in range(6)]
        engine.step()
        engine.step()
        assert engine.stats()["slots_in_use"] == 4 and engine.stats()["queue_length"] == 2
        engine.cancel("c0")  # decoding by now
        engine.cancel("c5")  # still queued
        engine.step()
        stats = engine.stats()
        assert handles[0].finish_reason == "cancelled" and handles[5].finish_reason == "cancelled"
        assert stats["queue_length"] == 0 and stats["slots_in_use"] == 4  # c4 took c0's slot
        assert stats["cancelled"] - before["cancelled"] == 2
        for i in (1, 2, 3, 4):
            engine.cancel(f"c{i}")
        engine.cancel("unknown")
        engine.step()
        assert not engine.step()  # idle
    stats = engine.stats()
    assert stats["slots_in_use"] == 0 and stats["cancelled"] - before["cancelled"] == 6
    assert all(h.finish_reason == "cancelled" for h in handles)
    assert 0 < len(handles[0].generated) < 60


def test_dispatch_length_follows_the_measured_step_time(engine, tiny, prompts):
    """A dispatch runs as many decode steps as fit in `dispatch_seconds` at the measured step time
    (1 to `steps_per_dispatch`, one program): a tiny budget gives one step per dispatch, a large one
    `steps_per_dispatch` (4); the tokens are the same either way."""
    budget, want = engine.dispatch_seconds, alone(tiny, prompts[0][:16], 13)
    dispatches = {}
    try:
        with nothing_compiles():
            for name, seconds in (("one step", 1e-9), ("four steps", 1e9)):
                engine.dispatch_seconds = seconds
                engine.submit(prompts[0][:16], greedy(1))  # a step time measured before the request
                engine.run_until_idle()
                before = engine.stats()["dispatches"]
                handle = engine.submit(prompts[0][:16], greedy(13))  # one prefill chunk: its first token
                engine.run_until_idle()
                dispatches[name] = engine.stats()["dispatches"] - before
                assert handle.generated == want, name
    finally:
        engine.dispatch_seconds = budget
    assert dispatches == {"one step": 12, "four steps": 3}  # 12 decode steps after the prefill's token


def test_each_prefill_chunk_carries_a_decode_step(engine, tiny, prompts, monkeypatch):
    """While a request decodes, each chunk of another's prompt (40 tokens: chunks of 16, 16, 8) runs
    in one call with the next decode step (`state.step`): the running request gains a token with
    every chunk, no separate decode dispatch runs until the prompt is in, and both get the tokens
    `generate` gives each alone."""
    calls = []
    call = engine._call
    monkeypatch.setattr(engine, "_call", lambda name, *args: calls.append(name) or call(name, *args))
    long_prompt = (prompts[1] + prompts[2])[:40]
    with nothing_compiles():
        running = engine.submit(prompts[0][:16], greedy(10))
        engine.step()  # its prefill: its first token
        assert len(running.generated) == 1
        joining = engine.submit(long_prompt, greedy(6))
        gained = []
        for _ in range(3):
            del calls[:]
            before = len(running.generated)
            engine.step()
            gained.append(len(running.generated) - before)
            assert [c for c in calls if c in ("step", "decode")] == ["step"], calls
        assert gained == [1, 1, 1] and len(joining.generated) == 1  # the last chunk made its first token
        engine.run_until_idle()
    assert running.generated == alone(tiny, prompts[0][:16], 13)[:10]
    assert joining.generated == alone(tiny, long_prompt, 6)


def test_prefix_reuse_prefills_only_the_new_tokens(engine, tiny, prompts):
    """A request whose prompt extends a finished one's prompt + output (the next turn) prefills only
    the new tokens and gives the tokens of a full prefill; a prompt that shares only a beginning
    (past the sliding ring) is prefilled whole."""
    first_prompt = prompts[5][:18]
    with nothing_compiles():
        first = engine.submit(first_prompt, greedy(8))
        engine.run_until_idle()
        turn = first_prompt + first.generated + [11, 12, 13, 14]
        before = engine.stats()
        follow = engine.submit(turn, greedy(20))
        engine.run_until_idle()
        after = engine.stats()
        diverging = engine.submit(first_prompt[:15] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], greedy(10))
        engine.run_until_idle()
    reused = len(first_prompt) + len(first.generated) - 1  # the last generated token was never fed
    assert follow.cached_tokens == reused
    assert after["cached_tokens"] - before["cached_tokens"] == reused
    assert after["prefilled_tokens"] - before["prefilled_tokens"] == len(turn) - reused
    assert follow.generated == alone(tiny, turn, 30)[:20]
    assert diverging.cached_tokens == 0
    assert diverging.generated == alone(tiny, first_prompt[:15] + [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 30)[:10]


@pytest.mark.parametrize("prompt, settings, message", [
    ([], {}, "prompt is empty"),
    ([1, 136], {}, r"prompt token 136 at index 1 is not a token id in \[0, 136\)"),
    ([1, -2], {}, "prompt token -2"),
    ("hello", {}, "not a string"),
    ([1] * 100, {"max_tokens": 29}, "prompt of 100 tokens \\+ max_tokens 29 exceeds the engine's context of 128"),
    ([1], {"forced_tokens": tuple(range(9))}, "forced_tokens holds 9 tokens; the engine takes at most 8"),
    ([1], {"forced_tokens": (136,)}, "forced_tokens: token id 136 is outside"),
    ([1], {"allowed_tokens": (1, 136)}, "allowed_tokens: token id 136"),
    ([1], {"stop_tokens": (1, 2, 3, 4, 5)}, "stop_tokens holds 5 tokens"),
])
def test_bad_requests_are_refused_before_any_work(engine, prompt, settings, message):
    before = engine.stats()
    with pytest.raises(Refused, match=message) as err:
        engine.submit(prompt, RequestSettings(**{"max_tokens": 4, **settings}))
    # the field at fault, for a server to name (the settings' field, or the prompt)
    assert err.value.reason == "invalid" and err.value.field == next(iter(settings), "prompt"), err.value.field
    after = engine.stats()
    assert after["submitted"] == before["submitted"] and after["refused"] == before["refused"] + 1


@pytest.mark.parametrize("settings, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"min_p": 1.0}, "min_p"),
    ({"seed": -1}, "seed"), ({"allowed_tokens": ()}, "allowed_tokens must not be empty"),
    ({"stop_tokens": (1, -3)}, "stop_tokens must be a tuple of token ids"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(Refused, match=message) as err:
        RequestSettings(**{"max_tokens": 4, **settings})
    assert err.value.reason == "invalid" and err.value.field == next(iter(settings))
    assert issubclass(Refused, ValueError)


def test_a_full_queue_and_a_reused_id_are_refused(engine, prompts):
    with nothing_compiles():
        handles = [engine.submit(prompts[0], greedy(4), request_id=f"q{i}") for i in range(6)]
        with pytest.raises(Refused, match="the queue is full \\(6 requests waiting\\)") as err:
            engine.submit(prompts[0], greedy(4))
        assert err.value.reason == "busy"  # a server's 429
        engine.step()
        with pytest.raises(Refused, match="request id 'q5' is already in use") as err:
            engine.submit(prompts[0], greedy(4), request_id="q5")
        assert err.value.field == "request_id"
        engine.run_until_idle()
    assert all(h.finish_reason == "length" for h in handles)
    assert engine.submit(prompts[0], greedy(1), request_id="q5") is not None  # free again once finished
    engine.run_until_idle()


def test_background_loop_streams_tokens(engine, tiny, prompts):
    """With `start`, handles stream their tokens (blocking and asyncio) as the loop makes them."""
    engine.start()
    try:
        a = engine.submit(prompts[1], greedy(13))
        b = engine.submit(prompts[4], greedy(9))
        chunks = list(a.stream())

        async def collect():
            return [chunk async for chunk in b.astream()]

        async_chunks = asyncio.run(collect())
    finally:
        engine.stop()
    assert sum(chunks, []) == a.generated == alone(tiny, prompts[1], 30)[:13] and len(chunks) > 1
    assert sum(async_chunks, []) == b.result(timeout=10) == alone(tiny, prompts[4], 30)[:9]
    assert engine.error is None and engine.ready
