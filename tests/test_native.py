"""The native CPU kernels (`ops.native`, `ops/cpu_kernels.cc`) against the pure-JAX paths: the grouped
matmul against the tiles (float32, bfloat16, bfloat16 bits; one layer or stacked; empty groups, rows
past the last group, column tails, threaded sizes), the unembedding against XLA's product (the same
dtypes, row and vocabulary tails, skipped rows), gradients, where the model uses them, and the
fallbacks."""

import dataclasses
import logging
import re
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.model import build
from gptoss_jax.ops import matmul, native, platform
from gptoss_jax.quant import MXFP4Weight

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the kernels are not built")


def _tiled(x, w, group_sizes, layer):
    return matmul._tiled_grouped_matmul(x, w, group_sizes, layer=layer)


def _case(rows, in_, out, sizes, layers=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (len(sizes), in_, out) if layers is None else (layers, len(sizes), in_, out)
    w = jnp.asarray(rng.standard_normal(shape, np.float32) * in_ ** -0.5)
    x = jnp.asarray(rng.standard_normal((rows, in_), np.float32))
    return x, w, jnp.asarray(sizes, jnp.int32)


CASES = {
    # rows, in, out, group sizes: 1-4 rows per group (each register block), empty groups, a column tail
    "small": (11, 24, 88, [1, 0, 4, 3, 0, 2], None),
    # 64 + 66 columns, 7 rows in one group (4 + 3), 2 rows past the last group (zero)
    "tail and padding": (13, 40, 130, [0, 7, 4, 0], None),
    # stacked layers, and enough work for the threads (m x in x out >= 2^20)
    "stacked, threaded": (37, 160, 200, [9, 0, 5, 23], 3),
    # threaded, groups of 1-4 rows (streamed, dealt out between the threads) beside a blocked one,
    # weight rows not a multiple of 4 and a column tail
    "streamed, threaded": (30, 203, 190, [1, 2, 0, 3, 4, 1, 2, 4, 3, 10], None),
    # threaded, in a multiple of 32 (AMX tiles where the CPU has them, bfloat16): groups of 5, 33
    # and 40 rows (partial 32-row tiles), 2 streamed, 208 columns (per thread 128 + 80: 32-column tiles
    # and a tail of 16 for the float32 blocks)
    "tiles, threaded": (80, 96, 208, [5, 0, 33, 2, 40], None),
    # threaded, one small group (a projection): its columns split between the threads, a column tail
    "one group, threaded": (3, 640, 1000, [3], None),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bits"])
def test_values_equal_the_tiled_grouped_matmul(name, dtype):
    rows, in_, out, sizes, layers = CASES[name]
    x, w, group_sizes = _case(rows, in_, out, sizes, layers)
    if dtype != "float32":  # x rounded to bfloat16 too, as `native.grouped_matmul` takes it then
        w, x = w.astype(jnp.bfloat16), x.astype(jnp.bfloat16).astype(jnp.float32)
    if dtype == "bits":
        w = jax.lax.bitcast_convert_type(w, jnp.uint16)  # as `ops.bits.as_bits` passes them
    layer = None if layers is None else jnp.int32(layers - 1)
    got = jax.jit(lambda x, w, s: native.grouped_matmul(x, w, s, layer, reference=_tiled))(x, w, group_sizes)
    want = jax.jit(lambda x, w, s: _tiled(x, w, s, layer))(x, w, group_sizes)
    got, want = np.asarray(got), np.asarray(want)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), (name, dtype)
    used = sum(sizes)
    assert np.all(got[used:] == 0) and np.all(np.abs(got[:used]).max(axis=1) > 0)


def test_gradients_are_the_tiled_ones():
    rows, in_, out, sizes, layers = CASES["stacked, threaded"]
    x, w, group_sizes = _case(rows, in_, out, sizes, layers, seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((rows, out), np.float32))

    def grads(fn):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * cotangent), argnums=(0, 1)))(x, w)

    got = grads(lambda x, w: native.grouped_matmul(x, w, group_sizes, jnp.int32(1), reference=_tiled))
    want = grads(lambda x, w: _tiled(x, w, group_sizes, jnp.int32(1)))
    for g, r, what in zip(got, want, ("dx", "dw")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6 * np.abs(r).max(), err_msg=what)


def test_the_model_runs_them_on_cpu_only_where_they_apply():
    """A CPU decode step (6 expert rows over 7 experts, 2 rows of logits) holds both custom calls; a
    long prefill (1920 expert rows, over `NATIVE_MAX_ROWS_PER_GROUP` per expert: the tiles do as well;
    640 rows of logits) and a program traced for TPU (an export must not carry them) do not."""
    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.abstract_params(config, jnp.float32)
    decode, prefill = jax.ShapeDtypeStruct((2, 1), jnp.int32), jax.ShapeDtypeStruct((2, 320), jnp.int32)
    assert 2 * 320 * config.experts_per_token > matmul.NATIVE_MAX_ROWS_PER_GROUP * config.num_experts
    forward = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))
    decode_text, prefill_text = forward.lower(params, decode).as_text(), forward.lower(params, prefill).as_text()
    with platform.lowering_for("tpu"):
        exported = jax.export.export(forward, platforms=["tpu"])(params, decode).mlir_module()
    for target in ("gptoss_grouped_matmul", "gptoss_unembed"):
        assert target in decode_text, target
        assert target not in prefill_text and target not in exported, target


def test_the_mxfp4_model_runs_the_mxfp4_kernel_on_cpu_only(monkeypatch):
    """MXFP4 experts: a CPU decode step and a long prefill hold the MXFP4 kernel (decoding as it reads
    beats the tiles at every size), a program traced for TPU does not; the model's logits equal the
    tiled path's."""
    config = dataclasses.replace(gptoss_jax.load_config("tiny-mxfp4"), expert_format="mxfp4")
    params = gptoss_jax.init_params(config, seed=3, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, 40)), jnp.int32)

    def forward():
        return jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))

    assert "gptoss_mxfp4_grouped_matmul" in forward().lower(params, tokens[:, :1]).as_text()
    assert "gptoss_mxfp4_grouped_matmul" in forward().lower(params, tokens).as_text()
    with platform.lowering_for("tpu"):
        exported = jax.export.export(forward(), platforms=["tpu"])(params, tokens[:, :1]).mlir_module()
    assert "gptoss_mxfp4_grouped_matmul" not in exported
    got = np.asarray(forward()(params, tokens))
    monkeypatch.setattr(matmul, "_native_here", lambda: False)
    tiled = forward()
    assert "gptoss_mxfp4_grouped_matmul" not in tiled.lower(params, tokens).as_text()
    want = np.asarray(tiled(params, tokens))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_int8_activations_move_only_the_decode_logits_a_little():
    """Config.expert_activations "int8": a decode step's logits move (within 2% of the largest), a
    prefill whose experts see more than 4 rows each does not; a bad value is refused by name."""
    config = dataclasses.replace(gptoss_jax.load_config("tiny-mxfp4"), expert_format="mxfp4")
    quantized = dataclasses.replace(config, expert_activations="int8")
    params = gptoss_jax.init_params(config, seed=3, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, config.vocab_size, (1, 96)), jnp.int32)

    def logits(config, tokens):
        return np.asarray(jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))(params, tokens))

    step, step_int8 = logits(config, tokens[:, :1]), logits(quantized, tokens[:, :1])
    assert 0 < np.max(np.abs(step_int8 - step)) <= 2e-2 * np.max(np.abs(step))
    prefill = logits(config, tokens)  # 96 tokens x 4 experts over 12: every expert takes > 4 rows
    assert np.array_equal(logits(quantized, tokens), prefill)
    with pytest.raises(ValueError, match="expert_activations"):
        dataclasses.replace(config, expert_activations="int4")


MXFP4_CASES = {
    # rows, in, out, group sizes, layers: 1-4 rows per group (decoded into registers), empty groups,
    # 5 blocks of 32 inputs (a partial chunk of 16 blocks only)
    "decode": (14, 160, 40, [1, 0, 4, 3, 0, 2, 4], 2),
    # 21 blocks: a full chunk and a partial one; groups of 5-9 rows (decoded rows, 4 + 1 x rows),
    # an odd column count (a last single decoded row), rows past the last group
    "chunk tail": (29, 672, 37, [5, 0, 9, 3, 7, 1], None),
    # enough work for the threads (m x in x out >= 2^20); 2880 inputs as gpt-oss has (90 blocks)
    "threaded": (52, 2880, 130, [1, 33, 2, 0, 14], 2),
}


def _mxfp4_case(rows, in_, out, sizes, layers, seed=0):
    shape = (len(sizes), in_, out) if layers is None else (layers, len(sizes), in_, out)
    w = MXFP4Weight.random(jax.random.key(seed), jax.random.key(seed + 1), shape)
    scales = np.array(w.scales)
    scales.reshape(-1)[::97] = 0  # e8m0 0: a block of zeros (2^-127 flushes), as the tiles decode it
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((rows, in_), np.float32))
    return x, MXFP4Weight(w.blocks, jnp.asarray(scales)), jnp.asarray(sizes, jnp.int32)


def _mxfp4_reference(x, blocks, scales, group_sizes, layer):
    return matmul._tiled_mxfp4(x, blocks, scales, group_sizes, layer)


@pytest.mark.parametrize("name", MXFP4_CASES)
def test_mxfp4_values_equal_the_tiled_grouped_matmul(name):
    """The MXFP4 kernel decodes exactly: only the float32 sums' order differs from the tiles'."""
    rows, in_, out, sizes, layers = MXFP4_CASES[name]
    x, w, group_sizes = _mxfp4_case(rows, in_, out, sizes, layers)
    layer = None if layers is None else jnp.int32(layers - 1)
    got = jax.jit(lambda x, b, s, g: native.mxfp4_grouped_matmul(x, b, s, g, layer, reference=_mxfp4_reference))(
        x, w.blocks, w.scales, group_sizes)
    want = jax.jit(lambda x, b, s, g: _mxfp4_reference(x, b, s, g, layer))(x, w.blocks, w.scales, group_sizes)
    got, want = np.asarray(got), np.asarray(want)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), name
    used = sum(sizes)
    assert np.all(got[used:] == 0) and np.all(np.abs(got[:used]).max(axis=1) > 0)


def _q8_0(x):
    """Rows of x quantized per block of 32 as the int8 path does (llama.cpp's Q8_0), back to float32."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inverse = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return (np.rint(blocks * inverse) * d).reshape(x.shape)


@pytest.mark.parametrize("name", MXFP4_CASES)
def test_mxfp4_int8_activations_are_q8_0_inputs(name):
    """int8 activations: groups of <= 4 rows multiply x rounded to Q8_0 (exact integer sums; only the
    float order differs), larger groups x itself; the rounding moves the result by ~0.5% (rms)."""
    rows, in_, out, sizes, layers = MXFP4_CASES[name]
    x, w, group_sizes = _mxfp4_case(rows, in_, out, sizes, layers, seed=3)
    layer = None if layers is None else jnp.int32(layers - 1)
    got = np.asarray(jax.jit(lambda x, b, s, g: native.mxfp4_grouped_matmul(
        x, b, s, g, layer, reference=_mxfp4_reference, int8_activations=True))(x, w.blocks, w.scales, group_sizes))
    small = np.repeat(np.asarray(sizes) <= 4, sizes)  # rows of the groups that quantize
    x_in = np.where(np.pad(small, (0, rows - len(small)))[:, None], _q8_0(np.asarray(x)), np.asarray(x))
    reference = jax.jit(lambda x, b, s, g: _mxfp4_reference(x, b, s, g, layer))
    want = np.asarray(reference(jnp.asarray(x_in), w.blocks, w.scales, group_sizes))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), name
    exact = np.asarray(reference(x, w.blocks, w.scales, group_sizes))[: len(small)][small]
    error = np.sqrt(np.mean((got[: len(small)][small] - exact) ** 2) / np.mean(exact ** 2))
    assert 1e-4 < error < 1e-2, (name, error)
    if name == "decode":  # a NaN in a quantized row poisons that row only, as in float
        x_nan = np.asarray(x).copy()
        x_nan[0, 5] = np.nan
        y = np.asarray(native.mxfp4_grouped_matmul(jnp.asarray(x_nan), w.blocks, w.scales, group_sizes, layer,
                                                   reference=_mxfp4_reference, int8_activations=True))
        assert np.isnan(y[0]).all() and not np.isnan(y[1:]).any()


def test_portable_builds_equal_the_pure_jax_paths(tmp_path):
    """Built without AVX2 (`-mno-avx2`, as on a CPU without it): the MXFP4 kernel decodes one code at
    a time into a buffer for every group size, the others use plain vector types; the same values."""
    # (-O1: a quicker build of the same paths)
    env = {**os.environ, "GPTOSS_JAX_NATIVE_FLAGS": "-mno-avx2 -O1", "GPTOSS_JAX_NATIVE_CACHE": str(tmp_path)}
    script = ("import sys; sys.path.insert(0, 'tests'); import test_native as t; from gptoss_jax.ops import native;"
              "assert native.mxfp4_decode() == 'portable', native.mxfp4_decode();"
              "[t.test_mxfp4_values_equal_the_tiled_grouped_matmul(name) for name in t.MXFP4_CASES];"
              "[t.test_mxfp4_int8_activations_are_q8_0_inputs(name) for name in ('decode', 'threaded')];"
              "[t.test_values_equal_the_tiled_grouped_matmul(name, 'bits') for name in ('streamed, threaded',"
              " 'one group, threaded', 'tail and padding')];"
              "t.test_values_equal_the_tiled_grouped_matmul('stacked, threaded', 'float32');"
              "t.test_unembed_equals_xla_and_skips_invalid_rows('tails', 'bits'); print('ok')")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parent.parent)
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_mxfp4_gradient_in_x_is_the_tiled_one():
    rows, in_, out, sizes, layers = MXFP4_CASES["decode"]
    x, w, group_sizes = _mxfp4_case(rows, in_, out, sizes, layers, seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((rows, out), np.float32))

    def grad(fn):
        return np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * cotangent)))(x))

    got = grad(lambda x: native.mxfp4_grouped_matmul(x, w.blocks, w.scales, group_sizes, jnp.int32(0),
                                                     reference=_mxfp4_reference))
    want = grad(lambda x: _mxfp4_reference(x, w.blocks, w.scales, group_sizes, jnp.int32(0)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


UNEMBED_CASES = {
    # rows, d, vocab: one row; 4 + 1 rows, d not a multiple of 16, a vocabulary tail (203 = 4 x 50 + 3)
    "one row": (1, 32, 96),
    "tails": (5, 40, 203),
    # enough work for the threads (m x d x v >= 2^20), an odd split of the vocabulary
    "threaded": (9, 160, 1203),
}


def _unembed_case(rows, d, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((rows, d), np.float32)),
            jnp.asarray(rng.standard_normal((vocab, d), np.float32) * d ** -0.5))


def _xla_unembed(x, table):
    """XLA's product; under a bfloat16 table of x rounded to bfloat16, as `native.unembed` takes it."""
    x = x.astype(matmul.bits.value_dtype(table)).astype(jnp.float32)
    return jnp.einsum("md,vd->mv", x, matmul.bits.read(table).astype(jnp.float32))


@pytest.mark.parametrize("name", UNEMBED_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bits"])
def test_unembed_equals_xla_and_skips_invalid_rows(name, dtype):
    x, table = _unembed_case(*UNEMBED_CASES[name])
    if dtype != "float32":
        table = table.astype(jnp.bfloat16)
    if dtype == "bits":
        table = jax.lax.bitcast_convert_type(table, jnp.uint16)
    want = np.asarray(jax.jit(_xla_unembed)(x, table))
    got = np.asarray(jax.jit(lambda x, t: native.unembed(x, t, reference=_xla_unembed))(x, table))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), (name, dtype)
    valid = np.arange(x.shape[0]) % 2 == 0  # rows 0, 2, 4, ...: computed; the others skipped
    masked = np.asarray(jax.jit(lambda x, t, v: native.unembed(x, t, reference=_xla_unembed, valid=v))(
        x, table, jnp.asarray(valid)))
    np.testing.assert_array_equal(masked[valid], got[valid])  # a row's logits do not depend on the others
    assert np.all(masked[~valid] == 0)


def test_unembed_gradients_are_xla_ones():
    x, table = _unembed_case(*UNEMBED_CASES["tails"], seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((x.shape[0], table.shape[0]), np.float32))
    valid = jnp.asarray([True, False, True, True, False])

    def grads(fn):
        return jax.jit(jax.grad(lambda x, t: jnp.sum(fn(x, t) * cotangent), argnums=(0, 1)))(x, table)

    got = grads(lambda x, t: native.unembed(x, t, reference=_xla_unembed, valid=valid))
    want = grads(lambda x, t: _xla_unembed(x, t) * valid[:, None])  # skipped rows: no gradient
    for g, r, what in zip(got, want, ("dx", "dtable")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6 * np.abs(r).max(), err_msg=what)


def test_model_logits_of_idle_slots_are_skipped():
    """`Transformer.logits(x, valid)`: the valid rows' logits equal the unmasked ones (the engine's
    decode passes its active slots)."""
    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.init_params(config, dtype=jnp.float32)
    hidden = jnp.asarray(np.random.default_rng(3).standard_normal((6, config.hidden), np.float32))
    valid = jnp.asarray([True, False, False, True, True, False])
    logits = jax.jit(lambda p, x, v: build(config, p).logits(x, valid=v))
    full, masked = np.asarray(logits(params, hidden, None)), np.asarray(logits(params, hidden, valid))
    np.testing.assert_array_equal(masked[np.asarray(valid)], full[np.asarray(valid)])
    assert np.all(masked[~np.asarray(valid)] == 0)


def test_fallbacks_say_why(monkeypatch, tmp_path, caplog):
    """GPTOSS_JAX_NATIVE=0 turns the kernels off; a missing or failing compiler leaves the pure-JAX
    path with one warning naming the cause, and no half-written library."""
    monkeypatch.setenv("GPTOSS_JAX_NATIVE_CACHE", str(tmp_path / "native"))
    try:
        native.available.cache_clear()
        monkeypatch.setenv("GPTOSS_JAX_NATIVE", "0")
        assert not native.available()
        monkeypatch.delenv("GPTOSS_JAX_NATIVE")
        for compiler, message in [(str(tmp_path / "no-such-compiler"), "no C++ compiler found"),
                                  ("false", "native CPU kernels unavailable")]:
            native.available.cache_clear()
            monkeypatch.setenv("CXX", compiler)
            with caplog.at_level(logging.WARNING, logger=native.__name__):
                assert not native.available()
            assert message in caplog.text, caplog.text
            caplog.clear()
        assert not list((tmp_path / "native").glob("*.so"))
    finally:
        native.available.cache_clear()
        monkeypatch.undo()
        assert native.available()


@pytest.mark.parametrize("spec, x_shape, w_shape", [("btd,dnh->btnh", (2, 3, 48), (48, 4, 20)),
                                                    ("btnh,nhd->btd", (1, 1, 4, 20), (4, 20, 48))])
def test_bfloat16_projections_run_natively_and_equal_xla(spec, x_shape, w_shape):
    """A bfloat16 projection of few rows on CPU is one native product of x [m, in] and the weight
    viewed as [in, out] (XLA:CPU would convert the weight to float32 first); it equals XLA's einsum."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32) * 0.1).astype(jnp.bfloat16)
    bits_w = jax.lax.bitcast_convert_type(w, jnp.uint16)
    project = jax.jit(lambda x, w: matmul.project(spec, x, w))
    assert "gptoss_grouped_matmul" in project.lower(x, bits_w).as_text()
    want = np.asarray(jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32)))
    for weight in (w, bits_w):
        got = np.asarray(project(x, weight))
        assert got.shape == want.shape and np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert matmul._as_matrix("btd,ndh->btnh", jnp.zeros((4, 48, 20))) is None  # contracted axis not leading


def test_projections_read_their_layer_in_place():
    """In the layer scan a bfloat16 projection hands the native kernel its whole stack [pairs, ...] and
    the layer's index (`ops.bits.LayerView`): no per-layer copy of the weight (XLA copies a slice a
    custom call takes); the logits equal the sliced path's."""
    config = gptoss_jax.load_config("tiny-a")
    params = matmul.bits.as_bits(gptoss_jax.init_params(config, seed=2, dtype=jnp.bfloat16))
    tokens = jnp.asarray([[5, 9]], jnp.int32)
    forward = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))
    text = forward.lower(params, tokens).as_text()
    pairs, d = config.num_layer_pairs, config.hidden
    operands = re.findall(r"custom_call @gptoss_grouped_matmul\(.*?\) .*?: \(tensor<\S+>, tensor<(\S+?)>", text)
    projections = [o for o in operands if o.split("x")[1] == "1"]  # (the experts': [pairs, experts, ...])
    assert len(projections) == 8 and all(o.startswith(f"{pairs}x1x") for o in projections), operands
    got = np.asarray(forward(params, tokens))
    sliced = jax.jit(lambda p, t: _without_views(lambda: gptoss_jax.forward(config, p, t)))
    assert f"tensor<{pairs}x1x{d}x" not in sliced.lower(params, tokens).as_text()
    np.testing.assert_allclose(got, np.asarray(sliced(params, tokens)), rtol=0, atol=1e-6 * np.abs(got).max())


def _without_views(fn):
    """fn() traced with the attention projections sliced per layer (no `LayerView`)."""
    from gptoss_jax import model
    saved, model.ATTENTION_MATRICES = model.ATTENTION_MATRICES, ()
    try:
        return fn()
    finally:
        model.ATTENTION_MATRICES = saved
