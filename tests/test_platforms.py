"""Choices follow the platform being lowered for (`gptoss_jax.ops.platform`), not the host.

1. The override: `platform.lowering_for` is part of jit's cache key and picks branches at trace time.
2. Every non-CPU branch XLA:CPU can execute runs here under `lowering_for("tpu")`: the grouped expert
   matmul on `ragged_dot` against the CPU's tiles (forward and gradients, plain and LoRA-adapted),
   projections and the unembedding, and the forward on a mesh with the MoE's ragged-all-to-all
   exchange (the CPU stand-in of the collective, the only part XLA:CPU cannot run natively) and
   splash per device (Pallas in interpret mode).
3. `jax.export(..., platforms=["tpu"] / ["cuda"])` on 8 simulated devices under the README presets:
   the forward (prefill- and decode-sized), the engine's decode step and the LoRA train step, with
   assertions on the lowered module: `ragged_all_to_all` exactly for prefill-sized batches with
   tokens split over `expert` (gpt-oss-120b on expert=8 at 8 x 512 tokens included; abstract params,
   nothing allocated), no all-gather of expert weights (but under FSDP, by design), and the Pallas
   TPU call on TPU (gpt-oss-20b's forward at 4096 tokens).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import sharding
from gptoss_jax.adapted import Adapted
from gptoss_jax.ops import matmul, platform

NO_CHECK = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
"""The native ragged all-to-all is a custom call without jax's compatibility guarantee (a known op
of XLA's GPU and TPU backends): exports that hold it say so."""

PRESETS_ON_8 = (("gpu-8", "cuda"), ("gpu-8-tp", "cuda"), ("gpu-8-train", "cuda"), ("tpu-v5e-8", "tpu"),
                ("tpu-v5p-8", "tpu"))
"""The README presets that fit 8 simulated devices (tpu-v5p-8 uses 4), each lowered for its platform
(gpt-oss-120b's case below is lowered for both)."""


# ---------------------------------------------------------------------------------------------
# 1. the override

def test_targets_follow_the_override_and_key_the_jit_cache():
    assert platform.targets() == (jax.default_backend(),) and not platform.overridden()
    f = jax.jit(lambda x: platform.select(x, cpu=lambda x: x + 1, default=lambda x: x + 2))
    assert int(f(0)) == (1 if jax.default_backend() == "cpu" else 2)
    with platform.lowering_for("tpu"):
        assert platform.targets() == ("tpu",) and platform.on_accelerators()
        assert int(f(0)) == 2  # traced again for TPU (the override is part of jit's cache key), run here
        with platform.lowering_for("cuda", "cpu"):
            assert platform.targets() == ("cuda", "cpu") and not platform.on_accelerators()
        with platform.lowering_for("cpu"):
            assert int(f(0)) == 1
    assert int(f(0)) == (1 if jax.default_backend() == "cpu" else 2)
    with pytest.raises(ValueError, match="unknown platform 'tpuv4'"):
        platform.lowering_for("tpuv4")


# ---------------------------------------------------------------------------------------------
# 2. non-CPU branches, run on CPU

def _on(target, fn, *args):
    with platform.lowering_for(target):
        return jax.jit(fn)(*args)


def _close(got, want, what, rtol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    error, scale = np.max(np.abs(got - want)), max(np.max(np.abs(want)), 1e-30)
    assert error <= rtol * scale, f"{what}: max error {error:.3g} vs max {scale:.3g}"


@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "lora"])
def test_ragged_dot_grouped_matmul_matches_the_tiles(adapted):
    """The GPU/TPU grouped matmul (`ragged_dot`) against the CPU's tiled scan, stacked weights read at a
    layer, uneven groups (one empty, rows past the last group): output and gradients (x, w, factors)."""
    rows, d_in, d_out, groups, layers, rank = 40, 16, 24, 5, 2, 4
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (rows, d_in))
    w = jax.random.normal(keys[1], (layers, groups, d_in, d_out)) * 0.3
    a = jax.random.normal(keys[2], (groups, d_in, rank)) * 0.3
    b = jax.random.normal(keys[3], (groups, rank, d_out)) * 0.3
    group_sizes = jnp.array([7, 0, 13, 1, 11], jnp.int32)  # 32 rows in groups, 8 past the last
    cotangent = jax.random.normal(keys[4], (rows, d_out))

    def fn(x, w, a, b):
        weight = Adapted(w, a, b) if adapted else w
        y, vjp = jax.vjp(lambda x, weight: matmul.grouped_matmul(x, weight, group_sizes, jnp.int32(1)), x, weight)
        return y, vjp(cotangent)

    (y_tiles, grads_tiles), (y_ragged, grads_ragged) = _on("cpu", fn, x, w, a, b), _on("tpu", fn, x, w, a, b)
    assert np.all(np.asarray(y_ragged)[32:] == 0)
    _close(y_ragged, y_tiles, "output")
    names = ("dx", "dw", "da", "db") if adapted else ("dx", "dw")
    for name, got, want in zip(names, jax.tree.leaves(grads_ragged), jax.tree.leaves(grads_tiles), strict=True):
        _close(got, want, f"gradient {name}")
    with platform.lowering_for("tpu"):
        tpu = jax.export.export(jax.jit(fn), platforms=["tpu"])(x, w, a, b).mlir_module()
    cpu = jax.jit(fn).lower(x, w, a, b).as_text()
    assert "ragged_dot" in tpu and "ragged_dot" not in cpu


def test_projection_and_unembedding_branches(monkeypatch):
    """A single bfloat16 row's projection (CPU: duplicated to two rows) and the unembedding (CPU:
    converted in chunks), each as its GPU/TPU branch computes it."""
    monkeypatch.setattr(matmul, "UPCAST_CHUNK_BYTES", 1024)  # several chunks of this small table
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], (1, 1, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (32, 4, 8)).astype(jnp.bfloat16)
    table = jax.random.normal(keys[2], (64, 32)).astype(jnp.bfloat16)
    project = lambda x, w: matmul.project("btd,dnh->btnh", x, w)
    _close(_on("tpu", project, x, w), _on("cpu", project, x, w), "single-row projection", 1e-6)
    unembed = lambda x, table: matmul.unembed(x, table)
    _close(_on("tpu", unembed, x, table), _on("cpu", unembed, x, table), "unembedding", 1e-6)


def test_splash_per_shard_on_a_mesh_traced_for_tpu(monkeypatch):
    """tiny-ep's forward on expert=4,tensor=2 with 80 tokens per device (prefill-sized), traced for
    TPU and run here: `auto` takes the ragged all-to-all (the CPU stand-in runs it) with ragged_dot,
    and attention is splash per device (in interpret mode); the one-device logits."""
    from test_sharding import CONFIG, SEED, assert_same_logits, forward_fn, make_tokens

    from gptoss_jax.ops import splash

    calls = []
    interpreted = splash.attend_splash

    def on_cpu(*args, **kwargs):
        calls.append(args[0].shape)
        return interpreted(*args, **{**kwargs, "interpret": True})

    monkeypatch.setattr(splash, "attend_splash", on_cpu)
    config = gptoss_jax.load_config(CONFIG)
    params = gptoss_jax.init_params(config, SEED, jnp.float32)
    tokens = make_tokens(config, 8, 40)
    reference = np.asarray(jax.jit(forward_fn(config))(params, tokens))
    mesh = sharding.make_mesh("expert=4,tensor=2")
    placed = jax.device_put(params, sharding.param_shardings(config, mesh))
    with jax.set_mesh(mesh), platform.lowering_for("tpu"):
        compiled = jax.jit(forward_fn(config)).lower(placed, tokens).compile()
        assert_same_logits(compiled(placed, tokens), reference, "expert=4,tensor=2 traced for tpu")
    assert calls and all(shape == (2, 40, 4, config.head_dim) for shape in calls), calls  # local shards
    assert "all-to-all" in compiled.as_text()  # the exchange (traced for this CPU, it all-gathers)


# ---------------------------------------------------------------------------------------------
# 3. exported for TPU and CUDA under the presets

def _abstract_on(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


@functools.cache
def _setup(config_name: str, preset: str, dtype=jnp.bfloat16):
    """(config, mesh, abstract params placed by the rules) for a preset on the simulated devices."""
    config = gptoss_jax.load_config(config_name)
    spec = sharding.PRESETS[preset][0]
    devices = int(np.prod(list(sharding.parse_mesh_spec(spec).values())))
    mesh = sharding.make_mesh(spec, devices=jax.devices()[:devices])
    params = _abstract_on(gptoss_jax.abstract_params(config, dtype), sharding.param_shardings(config, mesh))
    return config, mesh, params


def _export(fn, target, mesh, *args) -> str:
    with jax.set_mesh(mesh), platform.lowering_for(target):
        exported = jax.export.export(fn, platforms=[target], disabled_checks=NO_CHECK)(*args)
    assert exported.platforms == (target,)
    return exported.mlir_module()


def _all_gather_results(module: str) -> list[tuple[int, ...]]:
    """The result shape of every `stablehlo.all_gather` in a lowered module (each part of a tuple)."""
    shapes = []
    for match in re.finditer(r'"stablehlo\.all_gather"\(.*?\)\s*->\s*(\([^\n]*?\)|tensor<[^>]*>)', module):
        for dims in re.findall(r"tensor<([\dx]*?)x?[a-z]+\d*>", match.group(1)):
            shapes.append(tuple(int(n) for n in dims.split("x") if n))
    return shapes


def _expert_weight_gathers(module: str, config, mesh) -> list[tuple[int, ...]]:
    """All-gathers whose result is (a piece of) one layer's local expert matrices: [local experts,
    rows, columns] with rows and columns from embed and the expert intermediate (any split)."""
    local_experts = config.num_experts // mesh.shape["expert"]
    sides = {config.hidden, 2 * config.intermediate, config.intermediate}
    sides |= {n // k for n in tuple(sides) for k in (2, 4, 8)}
    return [s for s in _all_gather_results(module)
            if len(s) >= 3 and s[-3] == local_experts and set(s[-2:]) <= sides]


def _check_moe(module: str, config, mesh, prefill_sized: bool, what: str) -> None:
    tokens_split = mesh.shape["expert"] > 1
    assert ("@ragged_all_to_all" in module) == (prefill_sized and tokens_split), what
    gathers = _expert_weight_gathers(module, config, mesh)
    if mesh.shape["fsdp"] > 1:
        assert gathers, f"{what}: FSDP gathers each layer's expert weights by design (the check sees them)"
    else:
        assert not gathers, f"{what}: all-gathers of expert weights {gathers}"


@pytest.mark.parametrize("preset, target", PRESETS_ON_8)
def test_forward_exported_under_presets(preset, target):
    """tiny-ep's forward, prefill-sized (8 x 128 tokens: >= 128 per device) and decode-sized (8 x 1)."""
    config, mesh, params = _setup("tiny-ep", preset)
    run = jax.jit(lambda p, x: gptoss_jax.forward(config, p, x))
    for tokens, prefill_sized in ((8, 128), True), ((8, 1), False):
        module = _export(run, target, mesh, params, jax.ShapeDtypeStruct(tokens, jnp.int32))
        _check_moe(module, config, mesh, prefill_sized, f"{preset} {target} {tokens}")
        if target == "cuda":
            assert "tpu_custom_call" not in module
        else:  # splash per device (parallel.per_shard), sliding and full layers
            assert module.count("tpu_custom_call") >= 2, f"{preset} {tokens}"
        if mesh.size > 1:
            assert "ragged_dot" in module  # the GPU/TPU grouped matmul, not the CPU's tiles


@pytest.mark.parametrize("target", ["tpu", "cuda"])
def test_gpt_oss_120b_on_expert_8_exchanges_by_ragged_all_to_all(target):
    """The issue's case: gpt-oss-120b on expert=8 (gpu-8) at 8 x 512 tokens, from shapes."""
    config, mesh, params = _setup("gpt-oss-120b", "gpu-8")
    run = jax.jit(lambda p, x: gptoss_jax.forward(config, p, x))
    module = _export(run, target, mesh, params, jax.ShapeDtypeStruct((8, 512), jnp.int32))
    assert module.count("@ragged_all_to_all(") >= 2  # there and back (once in the scanned layer pair's body)
    _check_moe(module, config, mesh, True, f"120b expert=8 {target}")


def test_gpt_oss_20b_forward_at_4096_tokens_exported_for_tpu_holds_pallas():
    """One device, 4096 tokens: attention is the Pallas splash kernel (sliding and full layers)."""
    config = gptoss_jax.load_config("gpt-oss-20b")
    params = gptoss_jax.abstract_params(config, jnp.bfloat16)
    run = jax.jit(lambda p, x: gptoss_jax.forward(config, p, x))
    with platform.lowering_for("tpu"):
        module = jax.export.export(run, platforms=["tpu"])(params, jax.ShapeDtypeStruct((1, 4096), jnp.int32)
                                                           ).mlir_module()
    assert module.count("tpu_custom_call") >= 2
    assert "ragged_dot" in module


@pytest.mark.parametrize("preset, target", [("gpu-8-tp", "cuda"), ("tpu-v5e-8", "tpu")])
def test_engine_decode_step_exported_under_presets(preset, target):
    """The engine's decode dispatch (8 slots, 2 steps): decode-sized, so the all-gather exchange."""
    from gptoss_jax.engine import state as slot_ops

    config, mesh, params = _setup("tiny-ep", preset)
    with jax.set_mesh(mesh):
        state = jax.eval_shape(functools.partial(slot_ops.init_state, config, 8, 256, jnp.bfloat16, 4, 4))
    decode = jax.jit(functools.partial(slot_ops.decode, config, 2), donate_argnums=1)
    module = _export(decode, target, mesh, params, state)
    _check_moe(module, config, mesh, False, f"engine decode {preset} {target}")


@pytest.mark.parametrize("preset, target", [("gpu-8-train", "cuda"), ("tpu-v5p-8", "tpu")])
def test_lora_train_step_exported_under_presets(preset, target):
    """The LoRA train step on 8 x 128 tokens (one micro-batch): the ragged all-to-all exchange, forward
    and backward (expert LoRA factors included)."""
    from gptoss_jax.ops import bits
    from gptoss_jax.train.lora import LoraConfig
    from gptoss_jax.train.step import OptimConfig, init_state, make_train_step

    config, mesh, params = _setup("tiny-ep", preset, jnp.float32)
    lc, oc = LoraConfig(rank=4), OptimConfig()
    step = make_train_step(config, params, lc, oc, mesh=mesh).jitted
    state = jax.eval_shape(lambda: init_state(config, lc, oc))
    batch = {name: jax.ShapeDtypeStruct((1, 8, 128), jnp.float32 if name == "weights" else jnp.int32)
             for name in ("inputs", "targets", "positions", "weights")}
    module = _export(step, target, mesh, bits.as_bits(params), state, batch)
    _check_moe(module, config, mesh, True, f"train step {preset} {target}")
    assert module.count("@ragged_all_to_all(") >= 4  # forward there and back, and their transposes
