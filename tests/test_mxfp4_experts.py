"""MXFP4-native experts (issue 7): the in-graph decode, the dequantizing expert matmul, the model on
one device and on meshes, LoRA on a frozen MXFP4 base, no dense copy in the compiled program, and
the memory accounting of gpt-oss-20b / 120b. (Checkpoints and transformers parity: test_checkpoint.)"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import cache as cache_lib
from gptoss_jax import mxfp4
from gptoss_jax.ops import mxfp4 as mxfp4_kernel
from gptoss_jax.params import abstract_params, dequantize_experts
from gptoss_jax.quant import MXFP4Weight
from gptoss_jax.sharding import make_mesh, param_shardings
from gptoss_jax.train import lora as lora_lib
from gptoss_jax.train import step as step_lib

GiB = 1 << 30


def mxfp4_config(**changes) -> gptoss_jax.Config:
    """tiny-ep (16 experts, 8 / 2 heads: divides the meshes below) with MXFP4-sized dimensions:
    hidden 64 (2 blocks), intermediate 128 (4 blocks), head_dim 6, vocab 136, window 5."""
    base = gptoss_jax.load_config("tiny-ep")
    return dataclasses.replace(base, **{"hidden": 64, "intermediate": 128, "expert_format": "mxfp4", **changes})


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_decode_is_exact():
    codes = jnp.arange(16, dtype=jnp.uint8)
    values = np.asarray(mxfp4_kernel.decode_fp4(codes))
    np.testing.assert_array_equal(values, mxfp4.FP4_VALUES)
    np.testing.assert_array_equal(np.signbit(values), np.signbit(mxfp4.FP4_VALUES))  # -0.0 for code 8
    scales = np.arange(1, 255, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(mxfp4_kernel.decode_scales(jnp.asarray(scales))),
                                  np.ldexp(np.float32(1), scales.astype(np.int32) - 127))


def test_matmul_equals_transformers_dequantization():
    """`mxfp4_kernel.matmul` on stacked [layers, experts, ...] weights read by index equals x @ W with W from
    the host `dequantize` (bit-equal to transformers'), over several output chunks."""
    rng = np.random.default_rng(0)
    layers, experts, out, fan_in = 2, 3, 96, 128
    released = rng.integers(0, 256, (layers, experts, out, fan_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(115, 130, (layers, experts, out, fan_in // 32), dtype=np.uint8)
    blocks = jnp.asarray(mxfp4.from_released_layout(released))
    assert mxfp4_kernel.chunk_rows(out, fan_in) < out  # more than one decode-and-dot step
    x = rng.standard_normal((5, fan_in)).astype(np.float32)
    matmul = jax.jit(mxfp4_kernel.matmul)
    for layer, expert in ((0, 0), (1, 2), (0, 1)):
        w = mxfp4.dequantize(released[layer, expert], scales[layer, expert], dtype=np.float32)  # [out, in]
        expected = x.astype(np.float64) @ w.T.astype(np.float64)
        got = matmul(jnp.asarray(x), blocks, jnp.asarray(scales), (jnp.int32(layer), jnp.int32(expert)))
        assert relative_error(got, expected) < 1e-6
        dense = mxfp4_kernel.dense_matrix(blocks[layer, expert], jnp.asarray(scales[layer, expert]))
        np.testing.assert_array_equal(np.asarray(dense), w.T)


def test_relayout_against_the_released_bytes():
    """`from_released_layout` / `to_released_layout` against the committed tiny-mxfp4 bytes (released
    layout [E, out, G, 16], read with the safetensors library) and the in-memory layout as documented in
    mxfp4.py, built here index by index: byte j of block k at [..., j, k] holds inputs 32k + 2j (low
    nibble) and 32k + 2j + 1 (high nibble); decoding it so gives transformers' dequantization."""
    from conftest import FIXTURES
    from safetensors import safe_open

    name = "model.layers.1.mlp.experts.gate_up_proj"  # [5 experts, 128 out, 3 blocks, 16]
    with safe_open(FIXTURES / "tiny-mxfp4" / "model-00001-of-00002.safetensors", framework="np") as f:
        released, scales = f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales")
    experts, out, groups, _ = released.shape
    assert groups > 1 and len(np.unique(released)) > 200  # a relayout mistake cannot hide
    in_memory = np.zeros((experts, out, 16, groups), np.uint8)
    for j in range(16):
        for k in range(groups):
            in_memory[..., j, k] = released[..., k, j]
    values = np.zeros((experts, out, 32 * groups), np.float32)  # inputs in their natural order
    unit = np.exp2(scales.astype(np.float32) - 127)  # [E, out, G]
    for j in range(16):
        for k in range(groups):
            for n in range(2):
                code = (in_memory[..., j, k] >> (4 * n)) & 15
                values[..., 32 * k + 2 * j + n] = mxfp4.FP4_VALUES[code] * unit[..., k]
    np.testing.assert_array_equal(values, mxfp4.dequantize(released, scales, np.float32))  # = transformers'
    np.testing.assert_array_equal(mxfp4.from_released_layout(released), in_memory)
    assert mxfp4.to_released_layout(in_memory).tobytes() == released.tobytes()
    assert mxfp4.to_released_layout(in_memory).shape == released.shape


@pytest.fixture(scope="module")
def tiny():
    config = mxfp4_config()
    params = gptoss_jax.init_params(config, seed=3, dtype=jnp.float32)
    dense_config, dense_params = dequantize_experts(config, params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (4, 14)), jnp.int32)
    forward = jax.jit(gptoss_jax.forward, static_argnums=0)
    return config, params, dense_config, dense_params, tokens, forward, np.asarray(forward(config, params, tokens))


def test_params_are_packed_and_forward_equals_dequantized(tiny):
    config, params, dense_config, dense_params, tokens, forward, logits = tiny
    mlp = params["layers"]["full"]["mlp"]
    assert isinstance(mlp["gate_up"], MXFP4Weight) and mlp["gate_up"].blocks.dtype == jnp.uint8
    assert mlp["gate_up"].blocks.shape == (2, 16, 2 * 128, 16, 2) and mlp["down"].scales.shape == (2, 16, 64, 4)
    assert relative_error(logits, forward(dense_config, dense_params, tokens)) < 1e-5


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2", "fsdp=2,expert=4"])
def test_sharded_mxfp4_equals_one_device(tiny, spec):
    config, params, *_, tokens, forward, logits = tiny
    mesh = make_mesh(spec)
    shardings = param_shardings(config, mesh)
    blocks_spec = shardings["layers"]["sliding"]["mlp"]["down"].blocks.spec  # [layers, e, d, 16, i/32]
    assert blocks_spec[1] == ("expert" if "expert" in spec else None)
    assert blocks_spec[4] == ("tensor" if "tensor" in spec else None)  # the contracted dim's blocks
    sharded = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        assert relative_error(forward(config, sharded, tokens), logits) < 1e-5


def test_mesh_must_split_whole_blocks():
    with pytest.raises(ValueError, match=r"MXFP4 blocks of intermediate \(3\) % tensor \(2\)"):
        param_shardings(mxfp4_config(intermediate=96), make_mesh("expert=4,tensor=2"))


def test_lora_on_a_frozen_mxfp4_base_equals_the_dequantized_base(tiny):
    """Loss and every LoRA gradient (attention, per-expert gate_up / down) with the MXFP4 base equal
    those with its float32 dequantization."""
    config, params, dense_config, dense_params, *_ = tiny
    lc = lora_lib.LoraConfig(rank=3, alpha=6.0)
    keys = iter(jax.random.split(jax.random.key(5), 100))
    lora = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape), lora_lib.init_lora(config, lc))
    rng = np.random.default_rng(2)
    batch = {"inputs": rng.integers(0, config.vocab_size, (2, 16)).astype(np.int32),
             "targets": rng.integers(0, config.vocab_size, (2, 16)).astype(np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
             "weights": (rng.random((2, 16)) < 0.7).astype(np.float32)}

    def loss_and_grads(cfg, base):  # weights and batch as arguments, not constants of the program
        objective = lambda a, base, batch: step_lib.loss_fn(cfg, base, a, lc, batch, loss_chunk=16)  # noqa: E731
        return jax.jit(jax.value_and_grad(objective))(lora, base, batch)

    loss, grads = loss_and_grads(config, params)
    dense_loss, dense_grads = loss_and_grads(dense_config, dense_params)
    np.testing.assert_allclose(float(loss), float(dense_loss), rtol=1e-5)
    for (path, grad), dense in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(dense_grads)):
        assert np.max(np.abs(dense)) > 0, path
        assert relative_error(grad, dense) < 1e-4, jax.tree_util.keystr(path)


def test_compiled_decode_never_holds_dense_experts():
    """The compiled decode step's temporaries are a fraction of one layer's dense float32 experts
    (what dequantizing a layer at use would hold), let alone all layers': the picked experts are
    decoded a chunk of rows at a time."""
    config = mxfp4_config(hidden=256, intermediate=1024, num_experts=8, experts_per_token=2)
    params = abstract_params(config, jnp.float32)
    kv = cache_lib.abstract_cache(config, 1, 64, jnp.float32)

    def step(params, kv, tokens, positions):
        model = gptoss_jax.model.build(config, params)
        x, _, kv = model(tokens, positions, kv)
        return model.logits(x), kv

    token = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    temp = jax.jit(step).lower(params, kv, token, token).compile().memory_analysis().temp_size_in_bytes
    layer_experts = config.num_experts * 3 * config.hidden * config.intermediate * 4  # gate_up + down
    assert temp < layer_experts / 4, (temp, layer_experts)  # measured: 3.3 MB against 25 MB


def _gb(tree) -> float:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)) / 1e9


def test_memory_accounting_120b_and_20b():
    """gpt-oss-120b's MXFP4 weights (the rest bfloat16) + a 32k-token bfloat16 KV cache for one
    sequence fit one 80 GB accelerator, which the bfloat16 model cannot; 20b's weights fit 16 GB."""
    sizes = {}
    for name in ("gpt-oss-120b", "gpt-oss-20b"):
        config = dataclasses.replace(gptoss_jax.load_config(name), expert_format="mxfp4")
        cache = _gb(cache_lib.abstract_cache(config, 1, 32768, jnp.bfloat16))
        sizes[name] = (_gb(abstract_params(config, jnp.bfloat16)), cache,
                       _gb(abstract_params(dataclasses.replace(config, expert_format="dense"), jnp.bfloat16)))
    weights, cache, dense = sizes["gpt-oss-120b"]
    assert weights + cache < 80 and dense > 200, sizes  # ~65.3 + 1.2 GB against ~234 GB dense
    weights, cache, dense = sizes["gpt-oss-20b"]
    assert weights < 16 * GiB / 1e9 and dense > 40, sizes  # ~13.8 GB against ~41.8 GB dense
