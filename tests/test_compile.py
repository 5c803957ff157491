"""The full gpt-oss-20b forward compiles from abstract inputs (no weights allocated), quickly."""

import time

import jax
import jax.numpy as jnp

import gptoss_jax


def test_gpt_oss_20b_forward_compiles_from_shapes_in_under_60s():
    config = gptoss_jax.load_config("gpt-oss-20b")
    params = gptoss_jax.abstract_params(config, jnp.bfloat16)
    tokens = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t)).lower(params, tokens).compile()
    seconds = time.perf_counter() - start
    out = compiled.out_info
    assert out.shape == (1, 256, 201088) and out.dtype == jnp.float32
    # One scanned (sliding, full) pair, not 24 unrolled layers (each of which has >= 6 matmuls).
    hlo = compiled.as_text()
    assert " while(" in hlo and hlo.count(" dot(") < 2 * config.num_layers, hlo.count(" dot(")
    assert seconds < 60, f"compiling gpt-oss-20b took {seconds:.1f} s"
