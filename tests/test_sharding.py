"""The model on a device mesh (8 simulated CPU devices): same logits as one device, weights split as
the rules say, no all-gather of expert weights, golden partition specs, and two processes (gloo).

Run as a script, this file is the multi-host worker (see `test_two_processes_match_one_device`).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import sharding
from gptoss_jax.adapted import Adapted
from gptoss_jax.params import flatten, unflatten

FIXTURES = Path(__file__).parent / "fixtures"
CONFIG = "tiny-ep"  # 16 experts, 8 query / 2 KV heads, intermediate 24, vocab 136: divides every mesh below
SEED = 3
BATCH, SEQ = 8, 10
MESHES = ("expert=8", "tensor=8", "expert=4,tensor=2", "expert=2,tensor=4", "data=2,expert=2,tensor=2")
RTOL = 1e-5  # max |sharded - one device| <= RTOL * max |one device|
UPDATE_GOLDEN = os.environ.get("GPTOSS_JAX_UPDATE_GOLDEN") == "1"
GOLDEN_PRESETS = ("gpu-8", "gpu-8-tp", "gpu-8-train", "tpu-v5p-32", "hosts-2x8")
"""Presets whose partition specs for 20b and 120b are kept in tests/fixtures (a sharding change is a diff)."""


def skewed_params(config, params):
    """Router biases that send most tokens to a few experts (expert 0 nearly always, 1 and 5 often,
    the last two never), so that expert shards receive very different numbers of tokens, some none."""
    skew = jnp.zeros((config.num_experts,), jnp.float32).at[0].set(4.0).at[1].set(1.5).at[5].set(1.5)
    skew = skew.at[-2:].set(-8.0)
    layers = {kind: {**block, "mlp": {**block["mlp"], "router_bias": block["mlp"]["router_bias"] + skew}}
              for kind, block in params["layers"].items()}
    return {**params, "layers": layers}


def make_tokens(config, batch=BATCH, seq=SEQ):
    return np.random.default_rng(SEED).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)


def forward_fn(config):
    return lambda params, tokens: gptoss_jax.forward(config, params, tokens)


@pytest.fixture(scope="module")
def case():
    """The tiny config, its skewed float32 params on one device, tokens and one-device logits."""
    config = gptoss_jax.load_config(CONFIG)
    initial = gptoss_jax.init_params(config, SEED, jnp.float32)
    params = skewed_params(config, initial)
    tokens = make_tokens(config)
    logits = np.asarray(jax.jit(forward_fn(config))(params, tokens))
    return config, params, tokens, logits, initial


def assert_same_logits(actual, reference, what):
    error = np.max(np.abs(np.asarray(actual, np.float64) - reference))
    bound = RTOL * np.max(np.abs(reference))
    assert error <= bound, f"{what}: max |sharded - one device| = {error:.3g} > {bound:.3g}"


def run_on_mesh(config, params, tokens, mesh, strategy="auto"):
    """(logits, compiled HLO text) of the forward on `mesh`: params placed by the rules, one compile."""
    params = jax.device_put(params, sharding.param_shardings(config, mesh))
    with jax.set_mesh(mesh), sharding.moe_strategy(strategy):
        compiled = jax.jit(forward_fn(config)).lower(params, tokens).compile()
        return np.asarray(compiled(params, tokens)), compiled.as_text(), params


# ---------------------------------------------------------------------------------------------
# Mesh specs and rules (no compiles)

def test_mesh_specs():
    assert sharding.parse_mesh_spec("data=2, expert=-1") == {"data": 2, "expert": -1}
    assert sharding.mesh_shape("expert=-1,tensor=2", 8) == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 2}
    assert sharding.mesh_shape("", 1) == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2,
                                                                          "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.describe(mesh) == "data=2,expert=2,tensor=2"
    assert sharding.make_mesh("expert=-1").shape["expert"] == 8
    assert sharding.make_mesh("", devices=jax.devices()[:1]).size == 1
    for spec, message in [("expert=3", "needs 3 devices, but there are 8"), ("expert=3,tensor=-1", "multiple of 3"),
                          ("model=8", "unknown axis 'model'"), ("expert=-1,tensor=-1", "only one axis"),
                          ("expert=2,expert=4", "given twice"), ("expert=two", "must be an integer"),
                          ("expert", "axis=size"), ("tensor=0,expert=8", "positive")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sharding.make_mesh(spec)


def test_rules_never_split_one_tensor_twice_over_an_axis():
    for config_name in ("gpt-oss-20b", CONFIG):
        for axes in jax.tree.leaves(gptoss_jax.logical_axes(gptoss_jax.load_config(config_name)),
                                    is_leaf=lambda x: isinstance(x, tuple)):
            sharding.check_no_collision(axes)
    sharding.check_no_collision(("batch", "seq", "act_vocab"))
    with pytest.raises(ValueError, match="'experts' and 'embed' .* both map to mesh axis 'expert'"):
        sharding.check_no_collision(("experts", "embed"), {**sharding.RULES, "embed": ("expert",)})
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.check_no_collision(("embed", "heads"))


def test_shapes_that_do_not_divide_the_mesh_are_clear_errors():
    config = gptoss_jax.load_config("gpt-oss-20b")
    with pytest.raises(ValueError, match=re.escape("num_experts (32) % expert (3) != 0")):
        sharding.partition_specs(config, "expert=3")
    with pytest.raises(ValueError, match=re.escape("num_heads (64) % tensor (128) != 0")):
        sharding.partition_specs(config, "tensor=128")
    with pytest.raises(ValueError, match=re.escape("vocab_size (263) % tensor (2) != 0")):
        sharding.param_shardings(gptoss_jax.load_config("tiny-b"), sharding.make_mesh("expert=4,tensor=2"))
    # more tensor shards than KV heads: KV heads replicated, query heads still split
    specs = sharding.rules.spec_table(gptoss_jax.load_config("gpt-oss-120b"), "expert=8,tensor=16")
    assert specs["layers/full/attn/k"] == [None, None, None, None]
    assert specs["layers/full/attn/q"] == [None, None, "tensor", None]
    # activations take what divides: a decode batch of 2 is not split over expert=4
    sizes = sharding.axis_sizes({"data": 2, "expert": 4})
    assert sharding.activation_spec(("batch", "seq", "act_embed"), (2, 1, 8), sizes) == jax.P("data", None, None)
    assert sharding.activation_spec(("batch",), (16,), sizes) == jax.P(("data", "expert"))


def test_cache_specs_follow_the_rules():
    """KV cache leaves (CACHE_AXES): batch as the activations' batch (the prefix of data, fsdp, expert
    that divides), KV heads over tensor or replicated when tensor > KV heads, slots never split."""
    from gptoss_jax import cache as kv_cache

    assert sharding.RULES["cache_batch"] == sharding.RULES["batch"]
    for axes in kv_cache.CACHE_AXES.values():
        sharding.check_no_collision(axes)
    config = gptoss_jax.load_config("gpt-oss-120b")  # 8 KV heads; shapes only, nothing allocated
    data_expert, fsdp_expert = ("data", "expert"), ("fsdp", "expert")
    for batch, mesh, want_kv, want_positions in [
        (2, "data=2,expert=2,tensor=2", jax.P(None, "data", "tensor", None, None), jax.P("data", None)),
        (8, "data=2,expert=2,tensor=2", jax.P(None, data_expert, "tensor", None, None), jax.P(data_expert, None)),
        (1, "data=2,tensor=8", jax.P(None, None, "tensor", None, None), jax.P(None, None)),
        (4, "data=2,tensor=16", jax.P(None, "data", None, None, None), jax.P("data", None)),  # KV heads replicated
        (8, "fsdp=2,expert=4", jax.P(None, fsdp_expert, None, None, None), jax.P(fsdp_expert, None)),
        (4, "fsdp=2,expert=4", jax.P(None, "fsdp", None, None, None), jax.P("fsdp", None)),  # 4 % 8: a prefix
    ]:
        specs = sharding.cache_specs(kv_cache.abstract_cache(config, batch, 1024), mesh)
        assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, jax.P)) == jax.tree.structure(
            kv_cache.abstract_cache(config, batch, 1024))
        for kind in kv_cache.KINDS:
            assert specs[kind] == {"k": want_kv, "v": want_kv, "positions": want_positions}, (batch, mesh, kind)
    with pytest.raises(ValueError, match="not a KV cache"):
        sharding.cache_specs({"k": jax.ShapeDtypeStruct((1,), jnp.float32)}, "tensor=2")


def test_param_shardings_match_abstract_params():
    """The contract checkpoint.load_model relies on: the same tree as abstract_params, NamedShardings."""
    config, mesh = gptoss_jax.load_config("gpt-oss-20b"), sharding.make_mesh("expert=4,tensor=2")
    shardings = sharding.param_shardings(config, mesh)
    abstract = gptoss_jax.abstract_params(config)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    for path, named in flatten(shardings).items():
        assert isinstance(named, jax.sharding.NamedSharding) and named.mesh == mesh, path
        named.shard_shape(flatten(abstract)[path].shape)  # divides: raises otherwise


@pytest.mark.parametrize("config_name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_partition_specs_golden(config_name):
    """Param path -> PartitionSpec under the main presets, as committed: a sharding change is a diff
    (GPTOSS_JAX_UPDATE_GOLDEN=1 rewrites the file and fails, so that the rewrite gets reviewed)."""
    config = gptoss_jax.load_config(config_name)
    table = {name: {"mesh": sharding.PRESETS[name][0],
                    "specs": sharding.rules.spec_table(config, sharding.PRESETS[name][0])}
             for name in GOLDEN_PRESETS}
    path = FIXTURES / f"partition_specs_{config_name}.json"
    if UPDATE_GOLDEN:  # a rewritten golden proves nothing until reviewed: never a pass
        changed = not path.exists() or path.read_text() != _golden_json(table)
        path.write_text(_golden_json(table))
        pytest.fail(f"GPTOSS_JAX_UPDATE_GOLDEN=1: rewrote {path} ({'changed' if changed else 'unchanged'}); "
                    "review `git diff` of it, then run again without GPTOSS_JAX_UPDATE_GOLDEN", pytrace=False)
    assert path.exists(), f"{path} missing: run with GPTOSS_JAX_UPDATE_GOLDEN=1"
    golden = json.loads(path.read_text())
    for name in table:
        assert golden.get(name) == table[name], f"{config_name} under {name} differs from {path.name}"
    assert set(golden) == set(table)


def _golden_json(table):
    lines = ["{"]
    for i, (name, entry) in enumerate(table.items()):
        lines.append(f'  "{name}": {{"mesh": "{entry["mesh"]}", "specs": {{')
        rows = [f'    "{p}": {json.dumps(s)}' for p, s in entry["specs"].items()]
        lines.append(",\n".join(rows))
        lines.append("  }}" + ("," if i < len(table) - 1 else ""))
    return "\n".join(lines + ["}", ""])


# ---------------------------------------------------------------------------------------------
# The forward on meshes (one compile per mesh)

def test_routing_is_uneven(case, monkeypatch):
    """The test batch really loads the expert shards unevenly (recorded from the one-device forward)."""
    config, params, tokens, *_ = case
    recorded = []
    route = gptoss_jax.moe.route

    def recording_route(*args):
        ids, weights = route(*args)
        jax.debug.callback(lambda i: recorded.append(np.asarray(i)), ids)
        return ids, weights

    monkeypatch.setattr(gptoss_jax.moe, "route", recording_route)
    jax.block_until_ready(jax.jit(forward_fn(config))(params, tokens))
    assert len(recorded) == config.num_layers
    for ids in recorded:
        per_expert = np.bincount(ids.reshape(-1), minlength=config.num_experts)
        per_shard = per_expert.reshape(8, -1).sum(1)  # as on expert=8
        assert per_shard.max() >= 4 * np.sort(per_shard)[1] and per_shard.min() == 0, per_shard


def _expected_local_bytes(path, total, config, sizes):
    e, t = sizes["expert"], sizes["tensor"]
    name = path[-1]
    if name in ("gate_up", "down", "gate_up_bias"):
        return total // (e * t)
    if name == "down_bias":
        return total // e
    if name in ("q", "q_bias", "o", "sinks", "embed", "unembed"):
        return total // t
    if name in ("k", "v", "k_bias", "v_bias"):
        return total // t if t <= config.num_kv_heads else total  # replicated when tensor > KV heads
    return total


def _all_gather_results(hlo: str) -> list[tuple[int, ...]]:
    """Shape of every array an all-gather in `hlo` produces (each part of a tuple-shaped one too)."""
    shapes = []
    for match in re.finditer(r"= (\([^=]*?\)|\S+) all-gather(?:-start)?\(", hlo):
        parts = re.findall(r"\w+\[([\d,]*)\]", match.group(1))
        shapes += [tuple(int(x) for x in dims.split(",") if x) for dims in parts]
    return shapes


def _is_expert_matrix(axes: tuple[str, ...]) -> bool:
    """gate_up [(layers,) experts, embed, expert_mlp] and down [(layers,) experts, expert_mlp, embed]."""
    return "experts" in axes and len([a for a in axes if a != "layers"]) == 3


@functools.cache
def _weights(config_name: str) -> tuple[dict, dict]:
    """({path: shape}, {path: logical axes}) of a config's weights (nothing allocated)."""
    config = gptoss_jax.load_config(config_name)
    shapes = {path: s.shape for path, s in flatten(gptoss_jax.abstract_params(config)).items()}
    return shapes, flatten(gptoss_jax.logical_axes(config))


def _weight_gather_shapes(config, mesh, experts: bool) -> dict[tuple[int, ...], str]:
    """{last three dims: weight ("mlp/down")} of every array an all-gather of a weight can produce on
    `mesh`: each dim from its shard's size (as the rules split it) up to the full one, the shard itself
    excluded. experts=True: the expert matrices (keyed on their experts dim: [experts, rows, columns]);
    False: every other weight of >= 3 dims (attention's q, k, v, o, their biases, stacked routers, ...)."""
    sizes = sharding.axis_sizes(sharding.parse_mesh_spec(mesh) if isinstance(mesh, str) else mesh)
    shapes, logical = _weights(config.name)
    found = {}
    for path, shape in shapes.items():
        if _is_expert_matrix(logical[path]) != experts or len(shape) < 3:
            continue
        spec = sharding.rules.weight_spec(logical[path], shape, sizes)
        spec = tuple(spec) + (None,) * (len(shape) - len(spec))
        options, local = [], []
        for n, entry in list(zip(shape, spec))[-3:]:
            split = int(np.prod([sizes[a] for a in ((entry,) if isinstance(entry, str) else entry or ())]))
            options.append([n // k for k in range(1, split + 1) if split % k == 0])
            local.append(n // split)
        for dims in itertools.product(*options):
            if dims != tuple(local):
                found.setdefault(dims, "/".join(path[-2:]))
    return found


def _expert_weight_all_gathers(hlo, config, mesh) -> list[tuple[str, tuple[int, ...]]]:
    """(weight, dims) for each all-gather in the HLO whose result is (a piece of) an expert matrix,
    gate_up or down, recognised by its last three dims [experts, rows, columns] (see _weight_gather_shapes)."""
    expert_shapes = _weight_gather_shapes(config, mesh, experts=True)
    return [(expert_shapes[dims[-3:]], dims) for dims in _all_gather_results(hlo)
            if len(dims) >= 3 and dims[-3:] in expert_shapes]


@pytest.mark.parametrize("spec", MESHES + ("fsdp=2,expert=2,tensor=2",))
def test_expert_all_gather_detector_tells_expert_weights_apart(spec):
    """No all-gather of another weight can look like one of an expert matrix (tiny-ep's head_dim 6 is
    intermediate / 4: attention's o [heads, 6, 40] once passed for down [experts, 24 / 4, 40])."""
    config = gptoss_jax.load_config(CONFIG)
    expert_shapes = _weight_gather_shapes(config, spec, experts=True)
    other_shapes = _weight_gather_shapes(config, spec, experts=False)
    assert set(expert_shapes.values()) == {"mlp/gate_up", "mlp/down"}, spec
    both = {dims: (expert_shapes[dims], other_shapes[dims]) for dims in set(expert_shapes) & set(other_shapes)}
    assert not both, f"{spec}: all-gathers of these shapes could be either weight: {both}"


@pytest.mark.parametrize("spec", MESHES)
def test_mesh_logits_memory_and_hlo(case, spec):
    """Same logits as one device; per-device weight bytes as the rules say; no expert-weight all-gather."""
    config, params, tokens, reference, initial = case
    mesh = sharding.make_mesh(spec)
    if spec == "expert=4,tensor=2":  # init_params(mesh=) makes the same weights, directly in shards
        on_mesh = gptoss_jax.init_params(config, SEED, jnp.float32, mesh=mesh)
        for path, value in flatten(initial).items():
            np.testing.assert_array_equal(np.asarray(flatten(on_mesh)[path]), np.asarray(value), err_msg=str(path))
            assert flatten(on_mesh)[path].sharding.is_equivalent_to(
                flatten(sharding.param_shardings(config, mesh))[path], value.ndim)
    logits, hlo, placed = run_on_mesh(config, params, tokens, mesh)
    assert_same_logits(logits, reference, spec)

    sizes = sharding.axis_sizes(mesh)
    device = mesh.devices.flat[0]
    for path, array in flatten(placed).items():
        local = sum(s.data.nbytes for s in array.addressable_shards if s.device == device)
        assert local == _expected_local_bytes(path, array.nbytes, config, sizes), (spec, path, local, array.nbytes)
    assert not _expert_weight_all_gathers(hlo, config, sizes), spec
    if sizes["expert"] > 1:
        assert "reduce-scatter" in hlo or "all-reduce" in hlo


def test_ragged_all_to_all_exchange(case):
    """The all-to-all exchange (prefill-sized batches on GPU / TPU; emulated on CPU) gives the same
    logits, here with 2 of 8 expert shards receiving nothing."""
    config, params, tokens, reference, *_ = case
    logits, hlo, _ = run_on_mesh(config, params, tokens, sharding.make_mesh("expert=8"), "ragged_all_to_all")
    assert_same_logits(logits, reference, "expert=8 ragged_all_to_all")
    assert "all-to-all" in hlo


def test_expert_layer_gradients_with_lora():
    """Fine-tuning on a mesh: one MoE layer with per-expert LoRA, its output and gradients (input,
    expert weights, adapters) as on one device, through the all-to-all exchange with tensor-split
    experts and stacked [layers, e, ...] expert weights."""
    config = gptoss_jax.load_config(CONFIG)
    e, d, i, r, layers = config.num_experts, config.hidden, config.intermediate, 4, 2
    keys = iter(jax.random.split(jax.random.PRNGKey(SEED), 16))

    def normal(*shape, scale=0.3):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    x = normal(BATCH, SEQ, d, scale=1.0)
    ids, gates = gptoss_jax.moe.route(x, normal(d, e), normal(e), config.experts_per_token)
    weights = {"gate_up": normal(layers, e, d, 2 * i), "gate_up_bias": normal(e, 2 * i),
               "down": normal(layers, e, i, d), "down_bias": normal(e, d)}
    lora = {"gate_up": {"a": normal(e, d, r), "b": normal(e, r, 2 * i)},
            "down": {"a": normal(e, i, r), "b": normal(e, r, d)}}

    def loss(x, weights, lora):
        gate_up, down = (Adapted(weights[name], lora[name]["a"], lora[name]["b"]) for name in ("gate_up", "down"))
        y = gptoss_jax.moe.experts(x, ids, gates, gate_up, weights["gate_up_bias"], down,
                                   weights["down_bias"], alpha=config.swiglu_alpha, limit=config.swiglu_limit,
                                   layer=jnp.int32(1))
        return jnp.sum(jnp.sin(y)), y

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, ref_y), ref_grads = jax.jit(grad)(x, weights, lora)
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    with jax.set_mesh(mesh), sharding.moe_strategy("ragged_all_to_all"):
        (_, y), grads = jax.jit(grad)(x, weights, lora)
    assert_same_logits(y, np.asarray(ref_y, np.float64), "MoE layer output")
    for path, ref in flatten({"x": ref_grads[0], "w": ref_grads[1], "lora": ref_grads[2]}).items():
        got = np.asarray(flatten({"x": grads[0], "w": grads[1], "lora": grads[2]})[path], np.float64)
        error, scale = np.abs(got - np.asarray(ref, np.float64)).max(), np.abs(np.asarray(ref)).max()
        assert error <= 1e-4 * scale, f"gradient {'/'.join(path)}: error {error:.3g} vs max {scale:.3g}"


def test_emulated_ragged_all_to_all_follows_jax_semantics():
    """The CPU stand-in for jax.lax.ragged_all_to_all, on the example of that function's docstring."""
    from gptoss_jax.ops.collectives import _emulated_ragged_all_to_all

    mesh = jax.make_mesh((2,), ("expert",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    args = [np.array(a, np.int32) for a in (
        [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 1], [0, 1]], [[1, 2], [1, 1]],
        [[0, 0], [1, 2]], [[1, 1], [2, 1]])]
    exchange = jax.shard_map(
        lambda *a: _emulated_ragged_all_to_all(*(x[0] for x in a), axis_name="expert", axis_size=2)[None],
        mesh=mesh, in_specs=jax.P("expert"), out_specs=jax.P("expert"))
    np.testing.assert_array_equal(np.asarray(jax.jit(exchange)(*args)), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_decode_batch_smaller_than_expert_axis(case):
    """Batch 2 on expert=4: tokens stay replicated over the expert axis (nothing to gather)."""
    config, params, tokens, *_ = case
    small = tokens[:2, :3]
    reference = np.asarray(jax.jit(forward_fn(config))(params, small))
    logits, hlo, _ = run_on_mesh(config, params, small, sharding.make_mesh("expert=4,tensor=2"))
    assert_same_logits(logits, reference, "batch 2 on expert=4,tensor=2")
    assert not _expert_weight_all_gathers(hlo, config, {"expert": 4, "tensor": 2})


def test_fsdp_mesh(case):
    """Training layout: weights also split along embed over fsdp (gathered per layer), batch over fsdp."""
    config, params, tokens, reference, *_ = case
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    logits, hlo, placed = run_on_mesh(config, params, tokens, mesh)
    assert_same_logits(logits, reference, "fsdp=2,expert=2,tensor=2")
    gate_up = flatten(placed)[("layers", "full", "mlp", "gate_up")]
    assert gate_up.addressable_shards[0].data.nbytes == gate_up.nbytes // 8
    # FSDP all-gathers each layer's expert weights by design, which also shows the HLO check sees them
    # (both matrices), and its attention weights, which the check must not take for expert weights
    found = _expert_weight_all_gathers(hlo, config, mesh)
    assert {weight for weight, _ in found} == {"mlp/gate_up", "mlp/down"}, found
    other_shapes = _weight_gather_shapes(config, mesh, experts=False)
    others = [dims for dims in _all_gather_results(hlo) if len(dims) >= 3 and dims[-3:] in other_shapes]
    assert (4, 6, 40) in others, others  # attention's o [heads, head_dim, embed], gathered back over fsdp
    assert not [dims for _, dims in found if dims[-3:] in other_shapes], found


# ---------------------------------------------------------------------------------------------
# Two processes x 4 devices (gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(case, tmp_path):
    config, params, tokens, reference, *_ = case
    np.savez(tmp_path / "params.npz", **{"/".join(p): np.asarray(v) for p, v in flatten(params).items()})
    port = _free_port()
    from conftest import subprocess_env  # not at the top: this file is also the workers' script

    env = subprocess_env(devices=4)
    workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.monotonic() + 400  # a bound for hangs; a loaded 2-core machine needs well under it
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for worker in workers[len(outputs):]:
            worker.kill()
            outputs.append(worker.communicate()[0])
        logs = "\n".join(f"--- process {i}:\n{out[-2000:]}" for i, out in enumerate(outputs))
        pytest.fail(f"2-process run did not finish in 400 s:\n{logs}")
    for i, (worker, out) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    for i in range(2):
        assert_same_logits(np.load(tmp_path / f"logits_{i}.npy"), reference, f"2 processes, process {i}")


def _worker(process_id: int, port: int, out_dir: str) -> None:
    """One of two processes: 4 local devices, a data=2,expert=2,tensor=2 mesh over all 8."""
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    config = gptoss_jax.load_config(CONFIG)
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    assert {d.process_index for d in mesh.devices[0].flat} == {0}  # data (outermost) crosses processes

    def global_array(value, named_sharding):  # each process fills its own devices' shards
        return jax.make_array_from_callback(value.shape, named_sharding, lambda index: value[index])

    stored = np.load(Path(out_dir) / "params.npz")
    shardings = flatten(sharding.param_shardings(config, mesh))
    params = unflatten({path: global_array(stored["/".join(path)], named) for path, named in shardings.items()})
    tokens = global_array(make_tokens(config), jax.NamedSharding(mesh, jax.P(("data", "expert"))))
    with jax.set_mesh(mesh):
        logits = jax.jit(forward_fn(config))(params, tokens)
    np.save(Path(out_dir) / f"logits_{process_id}.npy", multihost_utils.process_allgather(logits, tiled=True))
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
