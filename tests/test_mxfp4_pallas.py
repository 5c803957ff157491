"""The MXFP4 Pallas TPU kernel (`ops.mxfp4.matmul_pallas`) in interpret mode against the pure-JAX
matmul (forward, and the gradient in x that LoRA on a frozen MXFP4 base uses), chosen by the grouped
expert matmul when traced for TPU, and lowered for TPU from this CPU host (120b's MXFP4 decode)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import sharding
from gptoss_jax.ops import matmul, mxfp4, platform
from gptoss_jax.quant import MXFP4Weight


def _close(got, want, what, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    error = np.max(np.abs(got - want))
    assert error <= rtol * np.max(np.abs(want)), f"{what}: max error {error:.3g} vs max {np.max(np.abs(want)):.3g}"


@pytest.mark.parametrize("lead, din, dout, rows", [((), 96, 128, 5)])
def test_kernel_in_interpret_mode_equals_the_pure_jax_matmul(lead, din, dout, rows):
    """One unstacked matrix (stacked ones read by index: the next test); bfloat16 x (as the experts get
    it: the kernel's bfloat16 cast of x is then exact)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    w = MXFP4Weight.random(keys[0], keys[1], (*lead, din, dout))
    x = jax.random.normal(keys[2], (rows, din)).astype(jnp.bfloat16)
    index = tuple(jnp.int32(i) for i in (1, 2)[:len(lead)])
    idx = jnp.stack(index) if index else jnp.zeros((1,), jnp.int32)
    got = jax.jit(lambda x, b, s, i: mxfp4.matmul_pallas(x, b, s, i, interpret=True))(x, w.blocks, w.scales, idx)
    _close(got, mxfp4.matmul_jax(x, w.blocks, w.scales, index), "forward")


def test_grouped_matmul_traced_for_tpu_takes_the_kernel(monkeypatch):
    """The tiled grouped matmul over MXFP4 experts traced for TPU (the kernel per tile, interpret mode)
    against the same traced for CPU: output and the gradient in x (the kernel's custom VJP)."""
    monkeypatch.setattr(mxfp4, "INTERPRET", True)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    w = MXFP4Weight.random(keys[0], keys[1], (2, 4, 64, 96))
    x = jax.random.normal(keys[2], (24, 64)).astype(jnp.bfloat16)
    cotangent = jax.random.normal(keys[3], (24, 96))
    group_sizes = jnp.array([5, 0, 11, 4], jnp.int32)

    def fn(x):
        y, vjp = jax.vjp(lambda x: matmul.grouped_matmul(x, w, group_sizes, jnp.int32(1)), x)
        return y, vjp(cotangent)[0]

    with platform.lowering_for("cpu"):
        y_ref, dx_ref = jax.jit(fn)(x)
    with platform.lowering_for("tpu"):
        traced = jax.jit(fn).trace(x).jaxpr
        y, dx = jax.jit(fn)(x)
    assert "pallas_call" in str(traced)
    _close(y, y_ref, "output")
    _close(dx.astype(jnp.float32), dx_ref.astype(jnp.float32), "gradient in x", 1e-2)  # bfloat16 x: its rounding


def test_gpt_oss_120b_mxfp4_decode_exported_for_tpu_holds_the_kernel():
    """gpt-oss-120b with MXFP4 experts on expert=8 (gpu-8), a decode-sized batch (8 x 1), from shapes."""
    config = dataclasses.replace(gptoss_jax.load_config("gpt-oss-120b"), expert_format="mxfp4")
    mesh = sharding.make_mesh("expert=8")
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          gptoss_jax.abstract_params(config), sharding.param_shardings(config, mesh))
    run = jax.jit(lambda p, x: gptoss_jax.forward(config, p, x))
    with jax.set_mesh(mesh), platform.lowering_for("tpu"):
        module = jax.export.export(run, platforms=["tpu"])(params, jax.ShapeDtypeStruct((8, 1), jnp.int32)
                                                           ).mlir_module()
    kernels = module.count("tpu_custom_call")
    assert kernels >= 4, kernels  # gate_up and down in both layers of the scanned pair, + splash
    with jax.set_mesh(mesh), platform.lowering_for("cuda"):
        cuda = jax.export.export(run, platforms=["cuda"])(params, jax.ShapeDtypeStruct((8, 1), jnp.int32)).mlir_module()
    assert "tpu_custom_call" not in cuda
