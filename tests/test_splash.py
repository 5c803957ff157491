"""The Pallas splash backend of attention (`attend_splash`) against the dense oracle `attend`.

The kernel runs in interpret mode on CPU (slow: sizes stay small, one test at T ~ 1k); a last test
lowers it for TPU (interpret=False) from this machine and finds the Pallas custom call.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.ops.attention import attend_dense as attend
from gptoss_jax.ops.splash import attend_splash

TOLERANCE = 1e-5  # relative to the oracle's largest magnitude; measured ~1e-6 (out and all four grads)


def _inputs(seed: int, b: int, t: int, n: int, kv: int, h: int = 64):
    r = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)
    return (normal(b, t, n, h), normal(b, kv, t, h), normal(b, kv, t, h), normal(n)), normal(b, t, n, h)


def _values_and_grads(fn, args, cotangent):
    """fn's output and the gradients of <fn(...), cotangent> with respect to q, k, v and sinks."""
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


def _assert_matches(positions, window, segments, args, cotangent):
    """Splash (interpret mode) against the dense oracle: output, dq, dk, dv, dsinks; returns the output."""
    splash = jax.jit(lambda *a: _values_and_grads(
        lambda *x: attend_splash(*x, positions, window, segments, interpret=True), a, cotangent))
    dense = jax.jit(lambda *a: _values_and_grads(
        lambda *x: attend(*x, positions, positions, window, segments, segments), a, cotangent))
    (out, grads), (out_ref, grads_ref) = splash(*args), dense(*args)
    for name, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads), (out_ref, *grads_ref)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        error = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert error < TOLERANCE, (name, error)
    return np.asarray(out)


def test_causal_gqa_packed_segments_and_padding():
    """8 query heads over 2 KV heads, three packed examples per row, left / right padding, T=200 (-> 256)."""
    b, t = 2, 200
    args, cotangent = _inputs(0, b, t, n=8, kv=2)
    lengths = [(70, 50, 80), (120, 33, 47)]  # per row: segment lengths, positions restart in each
    segments = np.concatenate([np.repeat(np.arange(3), row) for row in lengths]).reshape(b, t)
    positions = np.concatenate([np.arange(n) for row in lengths for n in row]).reshape(b, t)
    positions[0, :5] = -1  # left padding inside the first segment
    positions[0, 5:70] = np.arange(65)
    positions[1, -7:] = -1  # right padding at the end of the last one
    out = _assert_matches(jnp.asarray(positions, jnp.int32), None, jnp.asarray(segments, jnp.int32),
                          args, cotangent)
    assert np.all(out[positions < 0] == 0)


def test_window_of_exactly_128_keys_at_t_1000():
    """Sliding window 128 at T=1000 (-> 1024, 512-blocks), 4 query heads over 1 KV head, left padding,
    no segment ids. A window one key short or long (127, 129) is measurably different."""
    b, t = 1, 1000
    args, cotangent = _inputs(1, b, t, n=4, kv=1)
    positions = np.arange(t)[None] - 3  # 3 padding tokens, then 0, 1, ...
    positions = jnp.asarray(np.where(positions < 0, -1, positions), jnp.int32)
    out = _assert_matches(positions, 128, None, args, cotangent)
    assert np.all(out[0, :3] == 0)
    for off_by_one in (127, 129):
        other = np.asarray(attend(*args, positions, positions, off_by_one))
        assert np.max(np.abs(other - out)) > 100 * TOLERANCE * np.max(np.abs(out)), off_by_one


def test_lowers_to_the_tpu_pallas_kernel():
    """Exported for TPU from this CPU machine (interpret=False): forward and training step hold the
    Pallas TPU custom call (forward: one; gradient: forward, dq and dkv kernels)."""
    b, t, n, kv, h = 2, 256, 8, 2, 64
    spec = jax.ShapeDtypeStruct
    shapes = (spec((b, t, n, h), jnp.bfloat16), spec((b, kv, t, h), jnp.bfloat16),
              spec((b, kv, t, h), jnp.bfloat16), spec((n,), jnp.float32), spec((b, t), jnp.int32),
              spec((b, t), jnp.int32))

    def forward(q, k, v, sinks, positions, segments):
        return attend_splash(q, k, v, sinks, positions, 128, segments)

    def gradients(q, k, v, sinks, positions, segments):
        loss = lambda *a: jnp.sum(forward(*a, positions, segments).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

    for fn, kernels in ((forward, 1), (gradients, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes)
        assert exported.platforms == ("tpu",)
        assert exported.mlir_module().count("tpu_custom_call") >= kernels, fn.__name__


def test_the_model_forward_exported_for_tpu_uses_splash():
    """`gptoss_jax.forward` exported for TPU (from this CPU host, through `attention.lowering_for`) holds
    the Pallas kernel, one per layer kind; exported for TPU and CPU at once, and lowered for this
    CPU, it has none (blockwise attention)."""
    import gptoss_jax
    from gptoss_jax.ops import attention

    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.abstract_params(config, jnp.bfloat16)
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    run = jax.jit(lambda p, x: gptoss_jax.forward(config, p, x))
    with attention.lowering_for("tpu"):
        tpu = jax.export.export(run, platforms=["tpu"])(params, tokens).mlir_module()
    with attention.lowering_for("tpu", "cpu"):
        both = jax.export.export(run, platforms=["tpu", "cpu"])(params, tokens).mlir_module()
    cpu = run.lower(params, tokens).as_text()
    assert tpu.count("tpu_custom_call") == 2, tpu.count("tpu_custom_call")  # sliding and full, in one scanned pair
    assert "tpu_custom_call" not in both
    assert "tpu_custom_call" not in cpu
