"""The full gpt-oss-20b forward compiles from abstract inputs (no weights allocated), quickly: a real
compile, with the persistent compilation cache (tests/conftest.py) off, not a load from it."""

import contextlib
import time

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

import gptoss_jax


@contextlib.contextmanager
def persistent_cache_off():
    """The persistent compilation cache disabled inside (neither read nor written); yields the list of
    the '/jax/compilation_cache/...' events recorded meanwhile (empty when the cache was not asked)."""
    events = []

    def record(event, **_):
        if event.startswith("/jax/compilation_cache/") and event != "/jax/compilation_cache/task_disabled_cache":
            events.append(event)

    was_enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is used; ask again
    jax.monitoring.register_event_listener(record)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_listener(record)
        jax.config.update("jax_enable_compilation_cache", was_enabled)
        compilation_cache.reset_cache()


def test_gpt_oss_20b_forward_compiles_from_shapes_in_under_60s():
    config = gptoss_jax.load_config("gpt-oss-20b")
    params = gptoss_jax.abstract_params(config, jnp.bfloat16)
    tokens = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    lowered = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t)).lower(params, tokens)
    with persistent_cache_off() as cache_events:
        start = time.perf_counter()
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
    assert not cache_events, f"the compile asked the persistent cache: {cache_events}"
    out = compiled.out_info
    assert out.shape == (1, 256, 201088) and out.dtype == jnp.float32
    # One scanned (sliding, full) pair, not 24 unrolled layers (each of which has >= 6 matmuls).
    hlo = compiled.as_text()
    assert " while(" in hlo and hlo.count(" dot(") < 2 * config.num_layers, hlo.count(" dot(")
    assert seconds < 60, f"compiling gpt-oss-20b took {seconds:.1f} s"


def test_the_cache_check_sees_a_cache_load():
    """The event check above can fail: with the persistent cache on, a compile asks it."""
    events = []

    def record(event, **_):
        events.append(event)

    jax.monitoring.register_event_listener(record)
    try:
        jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.zeros((3,))).compile()
    finally:
        jax.monitoring.unregister_event_listener(record)
    assert "/jax/compilation_cache/compile_requests_use_cache" in events, events
