"""gpt-oss-20b at its 131,072-token context, from shapes (no weights allocated): what a compiled
prefill chunk, decode step and training step hold besides their inputs (`memory_analysis()`
temporaries), and that attention's memory grows linearly with the context."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import pytest

import gptoss_jax
from gptoss_jax import cache as cache_lib
from gptoss_jax.ops import attention, bits

generate = importlib.import_module("gptoss_jax.generate")  # the module (the package exports a function of that name)

GiB = 1 << 30
CONTEXT = 131072


def _as_steps_get_them(tree):
    """Abstract bfloat16 arrays as the jitted steps receive them on CPU (`bits.as_bits`: uint16)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, bits.BITS) if s.dtype == jnp.bfloat16 else s, tree)


@pytest.fixture(scope="module")
def model_20b():
    config = dataclasses.replace(gptoss_jax.load_config("gpt-oss-20b"), expert_format="mxfp4")
    return config, _as_steps_get_them(gptoss_jax.abstract_params(config, jnp.bfloat16))


def _temporaries(jitted, *args) -> int:
    """XLA's temporary buffers of `jitted` (with its own static and donated arguments) for `args`."""
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_prefill_chunk_against_a_full_context_cache_within_2_gib(model_20b):
    config, params = model_20b
    kv = _as_steps_get_them(cache_lib.abstract_cache(config, 1, CONTEXT, jnp.bfloat16))
    chunk = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    temp = _temporaries(generate.extend, config, params, kv, chunk, chunk)
    assert temp < 2 * GiB, f"prefill chunk temporaries {temp / GiB:.2f} GiB"


def test_decode_step_at_full_context_within_256_mib(model_20b):
    config, params = model_20b
    kv = _as_steps_get_them(cache_lib.abstract_cache(config, 1, CONTEXT, jnp.bfloat16))
    token, position, key = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
                            jax.eval_shape(lambda: jax.random.key(0)))
    temp = _temporaries(generate.decode_step, config, generate.Sampling(), params, kv, token, position, key)
    assert temp < 256 * (1 << 20), f"decode step temporaries {temp / (1 << 20):.0f} MiB"


def test_attention_training_memory_grows_linearly_with_the_context():
    """Forward + backward of one full and one sliding layer's attention at gpt-oss's 64 / 8 heads:
    temporaries at 32k, 64k, 128k tokens grow by ~2x per doubling (the dense T x T scores: 4x)."""
    def grads(q, k, v, sinks, positions):
        def loss(q, k, v, sinks):
            full = attention.attend(q, k, v, sinks, positions, positions, None)
            sliding = attention.attend(q, k, v, sinks, positions, positions, 128)
            return jnp.sum(full.astype(jnp.float32)) + jnp.sum(sliding.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    sizes = []
    for t in (32768, 65536, 131072):
        spec = jax.ShapeDtypeStruct
        args = (spec((1, t, 64, 64), jnp.bfloat16), spec((1, 8, t, 64), jnp.bfloat16),
                spec((1, 8, t, 64), jnp.bfloat16), spec((64,), jnp.bfloat16), spec((1, t), jnp.int32))
        sizes.append(_temporaries(jax.jit(grads), *args))
    for small, large in zip(sizes, sizes[1:]):
        assert 1.9 < large / small < 2.1, [s / GiB for s in sizes]
