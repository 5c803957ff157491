"""LoRA fine-tuning: gradients vs transformers + peft, PEFT files, merge, overfitting, data-parallel
and accumulated steps, the data pipeline, packing (per-example logits, loss and gradients, the loader),
and the finetune command (kill and resume, NaN stop, packing resume)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, Golden, assert_close_to_reference, subprocess_env

import gptoss_jax
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import lora as lora_lib
from gptoss_jax.train import loop
from gptoss_jax.train import step as step_lib

REPO = Path(__file__).resolve().parents[1]


def _positions(inputs: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.arange(inputs.shape[-1], dtype=np.int32), inputs.shape).copy()


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_lora_gradients_and_logits_match_peft(name):
    """peft's adapter file loads into our layout; logits with the adapter, the masked loss and the
    gradient of every LoRA tensor (attention, per-expert gate_up/down, router) equal torch autograd's
    through transformers + peft (float32), within 1e-4 relative."""
    golden = Golden(name)
    config, params = golden.config, golden.params(np.float32)
    directory = FIXTURES / f"{name}-lora"
    adapters, lc = lora_lib.load_peft(directory, config)
    assert (lc.rank, lc.alpha, lc.attention, lc.experts, lc.router) == (4, 8.0, ("q", "k", "v", "o"),
                                                                         ("gate_up", "down"), True)
    ref = dict(np.load(directory / "golden.npz"))
    micro = {"inputs": ref["inputs"], "targets": ref["targets"], "weights": ref["weights"],
             "positions": _positions(ref["inputs"])}

    @jax.jit
    def run(adapters):
        loss, grads = jax.value_and_grad(
            lambda a: step_lib.loss_fn(config, params, a, lc, micro, loss_chunk=16))(adapters)
        logits = gptoss_jax.forward(config, params, micro["inputs"], micro["positions"],
                                    lora=lora_lib.model_adapters(adapters, lc))
        return loss, grads, logits

    loss, grads, logits = run(adapters)
    assert_close_to_reference(logits, ref["logits"], f"{name} logits with LoRA")
    np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=1e-5)
    ours = lora_lib.to_peft(config, grads, lc)
    expected = {k.removeprefix("grad/").replace(".default.", "."): v for k, v in ref.items() if k.startswith("grad/")}
    assert sorted(ours) == sorted(expected)
    for key, value in ours.items():
        bound = 1e-4 * np.max(np.abs(expected[key]))
        assert np.max(np.abs(value - expected[key])) <= bound, key
    # and the relayout round-trips
    from safetensors.numpy import load_file

    stored = load_file(directory / "adapter_model.safetensors")
    again = lora_lib.to_peft(config, adapters, lc)
    assert all(np.array_equal(again[k], stored[k]) for k in stored) and sorted(again) == sorted(stored)


def _peft_gradients(name: str) -> dict[str, np.ndarray]:
    """torch autograd's gradient of every LoRA tensor (peft names, as `lora.to_peft` gives them)."""
    ref = np.load(FIXTURES / f"{name}-lora" / "golden.npz")
    return {k.removeprefix("grad/").replace(".default.", "."): ref[k] for k in ref.files if k.startswith("grad/")}


def test_optimizer_update_follows_the_gradient_scale():
    """The optimizer (clip, then AdamW) on torch's gradients: with eps = 1 the first update is
    -lr * g / (|g| + 1), which depends on the gradient's scale (with a small eps Adam's first step is
    lr * sign(g), blind to a scaled gradient); with the clip below the norm, g is first scaled to it."""
    grads = _peft_gradients("tiny-a")
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values()))
    params = {k: np.zeros_like(g) for k, g in grads.items()}
    for clip_norm, scale in ((10 * norm, 1.0), (1.0, 1.0 / norm)):
        oc = step_lib.OptimConfig(learning_rate=1.0, warmup_steps=0, total_steps=1, eps=1.0, clip_norm=clip_norm)
        optimizer = step_lib.make_optimizer(oc)
        updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
        for key, g in grads.items():
            want = -(scale * g.astype(np.float64)) / (np.abs(scale * g) + 1.0)
            error = np.max(np.abs(np.asarray(updates[key], np.float64) - want))  # (float32: a few ulps)
            assert error <= 1e-5 * np.max(np.abs(want)), f"clip {clip_norm:.3g} {key}: update off by {error:.3g}"


def _random_adapters(config, lc, seed=1):
    lora = lora_lib.init_lora(config, lc, seed)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
    return jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), lora)


def test_merge_equals_adapters_and_peft_export_roundtrips(tmp_path):
    golden = Golden("tiny-a")
    config, params = golden.config, golden.params(np.float32)
    lc = lora_lib.LoraConfig(rank=3, alpha=5.0, router=True)
    lora = _random_adapters(config, lc)
    tokens = jnp.asarray(golden.outputs["tokens"][:, :24])
    forward = jax.jit(lambda p, t, lora=None: gptoss_jax.forward(config, p, t, lora=lora))
    with_adapters = forward(params, tokens, lora_lib.model_adapters(lora, lc))
    merged = forward(lora_lib.merge(config, params, lora, lc), tokens)
    plain = forward(params, tokens)
    assert float(jnp.max(jnp.abs(with_adapters - plain))) > 0.1
    assert_close_to_reference(merged, with_adapters, "merged vs adapters")

    lora_lib.save_peft(tmp_path / "peft", config, lora, lc)
    loaded, lc2 = lora_lib.load_peft(tmp_path / "peft", config)
    assert lc2 == lc
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, lora)
    merged_dir = loop.save_merged(tmp_path / "merged", config, lora_lib.merge(config, params, lora, lc))
    config2, restored = gptoss_jax.load_model(merged_dir)
    assert_close_to_reference(forward(restored, tokens), with_adapters, "merged checkpoint")


PEFT_SET_BY_FIXTURE = ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters")
"""What make_lora_golden.py passes to peft.LoraConfig; peft wrote every other key of the fixture's
adapter_config.json at its own default."""


def test_adapter_config_matches_peft_and_unsupported_options_are_refused(tmp_path):
    """Our adapter_config.json against the one peft 0.21 wrote for the same adapter (tiny-a-lora), key by
    key; and every peft option we lack, set to a non-default value in that file, is refused with an
    error naming the option and the file (never silently ignored)."""
    peft_written = json.loads((FIXTURES / "tiny-a-lora" / "adapter_config.json").read_text())
    lc = lora_lib.LoraConfig(rank=4, alpha=8.0, router=True)
    ours = lora_lib.adapter_config(lc, base_model="some/base")
    assert set(PEFT_SET_BY_FIXTURE) <= set(ours) <= set(peft_written), sorted(set(ours) - set(peft_written))
    legitimately_different = {
        "base_model_name_or_path": "where the base model is: the fixture names its own directory",
        "task_type": "ours says CAUSAL_LM so that PeftModel.from_pretrained builds PeftModelForCausalLM; the "
                     "fixture's get_peft_model call passed none",
        "target_modules": "peft stores a set: the order is arbitrary (compared as sets below)",
    }
    for key in sorted(set(ours) - set(legitimately_different)):
        assert ours[key] == peft_written[key], (key, ours[key], peft_written[key])
    assert ours["task_type"] == "CAUSAL_LM" and peft_written["task_type"] is None
    assert sorted(ours["target_modules"]) == sorted(peft_written["target_modules"])
    # the target_parameters order is peft's ParamWrapper nesting, so it is compared as a list (above)
    assert ours["target_parameters"] == peft_written["target_parameters"]
    # peft's whole file, every default included, is accepted, and reads as our own export does
    assert lora_lib.lora_config_from_peft(peft_written) == lora_lib.lora_config_from_peft(ours) == lc
    assert lora_lib.lora_config_from_peft({**peft_written, "use_rslora": True}).scale == 8.0 / 2  # alpha / sqrt(r)

    refused = {
        "use_dora": True, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 16.0},
        "layers_to_transform": [0], "layers_pattern": "layers", "exclude_modules": ["k_proj"],
        "modules_to_save": ["lm_head"], "trainable_token_indices": [5], "layer_replication": [[0, 1]],
        "bias": "lora_only", "lora_bias": True, "fan_in_fan_out": True, "megatron_config": {"tp": 2},
        "use_qalora": True, "alora_invocation_tokens": [1, 2], "arrow_config": {"top_k": 2},
        "use_bdlora": {"blocks": 2}, "velora_config": {"a": 1}, "kasa_config": {"a": 1},
        "monteclora_config": {"a": 1}, "init_lora_weights": "pissa", "peft_type": "LOHA",
        "target_modules": "all-linear", "some_future_option": 3,
    }
    for key, value in refused.items():
        with pytest.raises(ValueError, match=rf"^cfg/adapter_config\.json: peft option {key} = .* is not supported"):
            lora_lib.lora_config_from_peft({**peft_written, key: value}, source="cfg/adapter_config.json")
    for key, value in {"init_lora_weights": "olora", "target_modules": ["q_proj", "gate_proj"],
                       "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.gate_proj"]}.items():
        with pytest.raises(ValueError, match=rf"peft option {key} = .* not supported"):
            lora_lib.lora_config_from_peft({**peft_written, key: value})
    with pytest.raises(ValueError, match="neither target_modules nor target_parameters"):
        lora_lib.lora_config_from_peft({**peft_written, "target_modules": None, "target_parameters": []})
    # load_peft names the file it read
    import shutil

    shutil.copytree(FIXTURES / "tiny-a-lora", tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**peft_written, "use_dora": True}))
    path = tmp_path / "dora" / "adapter_config.json"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: peft option use_dora = True is not supported"):
        lora_lib.load_peft(tmp_path / "dora", gptoss_jax.load_config("tiny-a"))


@pytest.mark.reference
def test_peft_loads_our_export_onto_transformers(tmp_path):
    """Our PEFT files, loaded by peft onto transformers' GptOss, give our logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    golden = Golden("tiny-a")
    config, params = golden.config, golden.params(np.float32)
    lc = lora_lib.LoraConfig(rank=4, alpha=8.0, router=True)
    lora = _random_adapters(config, lc, seed=3)
    lora_lib.save_peft(tmp_path, config, lora, lc, base_model=str(golden.dir))
    base = transformers.GptOssForCausalLM.from_pretrained(golden.dir, attn_implementation="eager",
                                                          experts_implementation="eager", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    tokens = golden.outputs["tokens"][:, :24]
    with torch.no_grad():
        reference = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    ours = gptoss_jax.forward(config, params, jnp.asarray(tokens), lora=lora_lib.model_adapters(lora, lc))
    assert_close_to_reference(ours, reference, "peft-loaded export")


def _fixed_batch(config, rows=8, seq=16, accum=1, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (accum, rows, seq + 1)).astype(np.int32)
    weights = (rng.random((accum, rows, seq)) < 0.7).astype(np.float32)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": weights,
            "positions": _positions(tokens[..., :-1])}


@pytest.mark.slow
def test_tiny_model_overfits_eight_examples():
    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)
    # The final RMSNorm bounds |hidden| (and so the logit margin) at its scale * sqrt(hidden); with
    # hidden 72 and a frozen scale near 1, p(target) tops out near 0.9 whatever the adapters do.
    params["norm"]["scale"] = params["norm"]["scale"] * 2
    batch = _fixed_batch(config)
    batch["weights"] = np.ones_like(batch["weights"])
    lc = lora_lib.LoraConfig(rank=8, alpha=16)
    oc = step_lib.OptimConfig(learning_rate=1e-2, warmup_steps=5, total_steps=40, end_lr_ratio=0.1)
    state = step_lib.init_state(config, lc, oc)
    train_step = step_lib.make_train_step(config, params, lc, oc)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = []
    for _ in range(40):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5 and losses[-1] < 0.05, losses[::5]
    assert int(state["step"]) == 40
    # base weights untouched, optimizer state only for the adapters
    assert jax.tree.structure(state["opt"][1][0].mu) == jax.tree.structure(state["lora"])


@pytest.mark.slow
def test_data_parallel_and_accumulated_steps_match_one_device():
    """data=8 (shard_map, psum) and 2 micro-batches of 4 give the one-device 1 x 8 step: losses and
    gradient norms at every step; and each, from peft's adapter on the golden batch, gives transformers
    + peft's loss and gradient norm."""
    from gptoss_jax.sharding import make_mesh

    golden = Golden("tiny-b")
    config = golden.config
    params = gptoss_jax.init_params(config, seed=1, dtype=jnp.float32)
    lc = lora_lib.LoraConfig(rank=4, alpha=8, router=True)
    oc = step_lib.OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=3)
    # seq 36: the golden batch's length, so that the same compiled steps also take it (below)
    batches = [_fixed_batch(config, rows=8, seq=36, seed=s) for s in range(3)]
    peft_adapters, peft_lc = lora_lib.load_peft(FIXTURES / "tiny-b-lora", config)
    assert peft_lc == lc
    ref = dict(np.load(FIXTURES / "tiny-b-lora" / "golden.npz"))
    rows = ref["inputs"].shape[0]  # 2 golden rows, then 6 of weight 0 to fill the batch of 8
    fill = lambda x: np.concatenate([x, np.zeros((8 - rows, *x.shape[1:]), x.dtype)])  # noqa: E731
    golden_batch = {"inputs": fill(ref["inputs"]), "targets": fill(ref["targets"]), "weights": fill(ref["weights"]),
                    "positions": _positions(fill(ref["inputs"]))}

    def run(mesh, accum):
        state = step_lib.init_state(config, lc, oc)
        p = params
        if mesh is not None:
            state, p = step_lib.replicate(state, mesh), step_lib.replicate(params, mesh)
        train_step = step_lib.make_train_step(config, p, lc, oc, mesh=mesh, remat="dots")
        losses, norms = [], []
        for b in batches:
            local = {k: v.reshape(accum, 8 // accum, *v.shape[2:]) for k, v in b.items()}
            state, metrics = train_step(state, step_lib.shard_batch(local, mesh))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        # the same compiled step, from peft's adapter with the golden model on the golden batch
        lora = jax.tree.map(jnp.array, peft_adapters)  # (a copy: the step donates its state)
        start = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": step_lib.make_optimizer(oc).init(lora)}
        golden_params = golden.params(np.float32)
        if mesh is not None:
            start, golden_params = step_lib.replicate(start, mesh), step_lib.replicate(golden_params, mesh)
        else:  # committed, as the step's outputs are: the compiled step then takes it as it is
            start = jax.device_put(start, jax.local_devices()[0])
        local = {k: v.reshape(accum, 8 // accum, *v.shape[1:]) for k, v in golden_batch.items()}
        _, metrics = train_step.jitted(golden_params, start, step_lib.shard_batch(local, mesh))
        return np.array(losses), np.array(norms), (float(metrics["loss"]), float(metrics["grad_norm"]))

    single, single_norms, single_ref = run(None, 1)
    parallel, parallel_norms, parallel_ref = run(make_mesh("data=8"), 1)
    accumulated, accumulated_norms, accumulated_ref = run(None, 2)
    # (losses after updates: Adam's g / sqrt(v) turns rounding in near-zero gradients into whole
    # steps of some adapter entries, so the adapters are not compared entry by entry)
    np.testing.assert_allclose(parallel, single, rtol=1e-5)
    np.testing.assert_allclose(accumulated, single, rtol=1e-5)
    # and the gradients' scale, at every step (AdamW is blind to a uniformly scaled gradient, and this
    # norm stays under the clip: a psum where a mean is due would leave the losses equal)
    assert np.all(single_norms < oc.clip_norm) and len(set(single_norms)) == len(batches)
    np.testing.assert_allclose(parallel_norms, single_norms, rtol=1e-5)
    np.testing.assert_allclose(accumulated_norms, single_norms, rtol=1e-5)
    # each way, the step's loss and gradient norm are transformers + peft's (torch autograd, float32)
    reference_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in _peft_gradients("tiny-b").values()))
    for what, (loss, grad_norm) in {"one device": single_ref, "data=8": parallel_ref,
                                    "2 micro-batches": accumulated_ref}.items():
        np.testing.assert_allclose(loss, float(ref["loss"]), rtol=1e-5, err_msg=what)
        np.testing.assert_allclose(grad_norm, reference_norm, rtol=1e-4, err_msg=what)


def test_lora_dropout_on_attention_inputs():
    """Dropout (attention adapters' inputs) changes the loss per key, and is off without a key. Its
    semantics, read off layer 0's output with that layer's MLP zeroed (so the output is linear in the
    `o` adapter's input): each element of the adapter's input is kept with probability 1 - p and then
    scaled by 1 / (1 - p), independently per element; the base path is never dropped; a key gives
    the same masks every time."""
    config = gptoss_jax.load_config("tiny-b")
    params = gptoss_jax.init_params(config, seed=1, dtype=jnp.float32)
    p = 0.25
    lc = lora_lib.LoraConfig(rank=4, alpha=8, dropout=p)
    lora = _random_adapters(config, lc)
    micro = {k: v[0] for k, v in _fixed_batch(config, rows=2, seq=12).items()}

    @jax.jit
    def run(params, lora, key):  # -> (the masked mean cross-entropy, layer 0's output [b, t, d])
        adapters = lora_lib.model_adapters(lora, lc, key)  # key None: no dropout (evaluation)
        logits, hidden = gptoss_jax.forward(config, params, micro["inputs"], micro["positions"], return_hidden=True,
                                            lora=adapters)
        token_losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), micro["targets"][..., None], -1)[..., 0]
        return jnp.sum(token_losses * micro["weights"]) / jnp.sum(micro["weights"]), hidden[0]

    plain = run(params, lora, None)[0]
    a, b = float(run(params, lora, jax.random.PRNGKey(0))[0]), float(run(params, lora, jax.random.PRNGKey(1))[0])
    assert a != b and a != float(plain) and float(run(params, lora, jax.random.PRNGKey(0))[0]) == a
    assert "dropout" not in lora_lib.model_adapters(lora, lc)["layers"]["full"]["attn"]
    np.testing.assert_allclose(plain, step_lib.loss_fn(config, params, lora, lc, micro), rtol=1e-5)  # the train loss

    # the base path is not dropped: with every b at zero, dropout changes nothing at all
    zero = jax.tree_util.tree_map_with_path(lambda path, x: x * 0 if path[-1].key == "b" else x, lora)
    for key in (jax.random.PRNGKey(0), jax.random.PRNGKey(1)):
        jax.tree.map(np.testing.assert_array_equal, run(params, zero, key), run(params, zero, None))

    # layer 0 (sliding, pair 0) without its MLP; only its `o` adapter, rank column j reading one element
    # (head heads[j], dim dims[j]) of the attention output and writing hidden feature features[j]
    mlp = params["layers"]["sliding"]["mlp"]
    linear = {**params, "layers": {**params["layers"], "sliding": {**params["layers"]["sliding"], "mlp": {
        **mlp, "down": mlp["down"].at[0].set(0), "down_bias": mlp["down_bias"].at[0].set(0)}}}}
    heads, dims, features = [0, 3, 5, 7], [1, 4, 9, 13], [2, 17, 33, 58]
    o = zero["layers"]["sliding"]["attn"]["o"]
    o_a, o_b = np.zeros(o["a"].shape, np.float32), np.zeros(o["b"].shape, np.float32)
    for j, (n, h, f) in enumerate(zip(heads, dims, features)):
        o_a[0, n, h, j], o_b[0, j, f] = 1.0, 10.0
    probe = {**zero, "layers": {**zero["layers"], "sliding": {**zero["layers"]["sliding"], "attn": {
        **zero["layers"]["sliding"]["attn"], "o": {"a": jnp.asarray(o_a), "b": jnp.asarray(o_b)}}}}}
    base = np.asarray(run(linear, zero, None)[1], np.float64)
    full = np.asarray(run(linear, probe, None)[1], np.float64)[..., features] - base[..., features]  # [b, t, 4]
    others = [i for i in range(config.hidden) if i not in features]
    assert np.max(np.abs(full)) > 1 and np.max(np.abs(np.asarray(run(linear, probe, None)[1])[..., others]
                                                      - base[..., others])) < 1e-5
    used = np.abs(full) > 1e-2 * np.max(np.abs(full))
    ratios, agree = [], []
    for seed in range(16):
        key = jax.random.PRNGKey(100 + seed)
        dropped = np.asarray(run(linear, probe, key)[1], np.float64)
        np.testing.assert_array_equal(dropped, run(linear, probe, key)[1])  # deterministic given the key
        ratio = (dropped[..., features] - base[..., features]) / np.where(used, full, 1.0)  # the mask, scaled
        ratios.append(ratio[used])
        kept, lost = np.isclose(ratio, 1 / (1 - p), atol=1e-3), np.isclose(ratio, 0.0, atol=1e-3)
        agree.append((kept.all(-1) | lost.all(-1))[used.all(-1)])
    ratios = np.concatenate(ratios)
    kept, dropped = np.isclose(ratios, 1 / (1 - p), atol=1e-3), np.isclose(ratios, 0.0, atol=1e-3)
    assert (kept | dropped).all(), np.unique(np.round(ratios, 3))  # scaled 1 / (1 - p) or dropped, nothing else
    assert ratios.size > 1000 and abs(kept.mean() - (1 - p)) < 0.05, (ratios.size, kept.mean())
    # one mask element per input element, not one per token: the 4 probed elements of a token usually differ
    assert np.concatenate(agree).mean() < 0.6, np.concatenate(agree).mean()  # independent: 0.75^4 + 0.25^4


# ---------------------------------------------------------------------------------------------
# data

CONVERSATION = {"messages": [{"role": "user", "content": "What is 2+2?"},
                             {"role": "assistant", "channel": "analysis", "content": "Simple sum."},
                             {"role": "assistant", "channel": "final", "content": "4"}]}


def test_data_masks_errors_truncation_and_host_slices(tmp_path):
    from gptoss_jax import harmony
    from gptoss_jax import tokenizer as tok

    path = tmp_path / "data.jsonl"
    long_text = "word " * 400
    path.write_text("\n".join([json.dumps(CONVERSATION), "{not json", json.dumps({"text": long_text}),
                               json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                               json.dumps({"text": "short one"})]) + "\n")
    reports = []
    dataset = data_lib.Dataset(path, seq_len=64, vocab_size=201088, report=reports.append)
    assert dataset.skipped == [2, 4] and len(dataset) == 3
    assert ":2: not valid JSON" in reports[0] and ":4: no assistant message" in reports[1]
    with pytest.raises(data_lib.DataError, match=r"data.jsonl:2: not valid JSON"):
        data_lib.Dataset(path, seq_len=64, vocab_size=201088, on_error="stop")

    enc = tok.get_encoding()
    example = dataset.example(0)
    messages = [harmony.Message(**m) for m in CONVERSATION["messages"]]
    assert example.tokens == harmony.render_for_training(harmony.Conversation(messages), enc)
    learned = enc.decode([t for t, m in zip(example.tokens, example.mask) if m])
    assert learned == "<|channel|>final<|message|>4<|return|>"  # analysis dropped, prompt not learned
    assert len(dataset.example(1).tokens) == 65 and dataset.truncated == 1

    # each process's rows are its slice of the same global batch
    whole = data_lib.Batches(dataset, batch_size=4, accumulation=2, seed=3).batch(5)
    parts = [data_lib.Batches(dataset, batch_size=4, accumulation=2, seed=3, process_index=i,
                              process_count=2).batch(5) for i in range(2)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), whole[key])
    # each row: its example's tokens[:-1] / tokens[1:] / mask[1:] from position 0, then padding (input
    # pad_id 0, position -1, weight 0) to seq_len
    plan = data_lib.Batches(dataset, batch_size=4, accumulation=2, seed=3).plan(5)
    padded = 0
    for r, (index,) in enumerate(plan):
        micro, row = divmod(r, 4)
        example = dataset.example(index)
        n = len(example.tokens) - 1
        pad = 64 - n
        padded += pad > 0
        expected = {"inputs": example.tokens[:-1] + [0] * pad, "targets": example.tokens[1:] + [0] * pad,
                    "positions": list(range(n)) + [-1] * pad, "weights": example.mask[1:] + [0] * pad}
        for key, value in expected.items():
            np.testing.assert_array_equal(whole[key][micro, row], value, err_msg=f"row {r} {key}")
    assert 0 < padded < len(plan)  # rows with padding and the truncated example's full row


# ---------------------------------------------------------------------------------------------
# packing several examples per row

def _examples(lengths, seed=0, vocab=301):
    """Random examples of the given token counts, each with a prompt (mask 0) then an answer (mask 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        prompt = int(rng.integers(1, n // 2))
        out.append(data_lib.Example(rng.integers(0, vocab, n).tolist(), [0] * prompt + [1] * (n - prompt)))
    return out


def _assert_relative(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    error, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol} x {scale:.3g}"


def test_packed_row_logits_equal_each_example_alone():
    """Two rows of two examples each (15-30 tokens: longer than tiny-a's 12-token sliding window),
    positions from 0 per example and segment ids: each example's logits equal its own forward's."""
    config = gptoss_jax.load_config("tiny-a")
    assert config.sliding_window == 12
    params = gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)
    examples = _examples([16, 31, 20, 25])
    rows = [examples[:2], examples[2:]]
    packed = data_lib.fill_rows(rows, 64, segments=True)
    forward = jax.jit(lambda tokens, positions=None, segments=None: gptoss_jax.forward(
        config, params, tokens, positions, segments=segments))
    logits = np.asarray(forward(packed["inputs"], packed["positions"], packed["segments"]))
    unmasked = np.asarray(forward(packed["inputs"], packed["positions"]))
    # each example alone from position 0, two to a call in rows of the packed shape (the unmasked
    # forward's program): its padding comes after it, which causal attention never shows it
    alone_inputs = np.zeros((len(examples), packed["inputs"].shape[1]), np.int32)
    for i, example in enumerate(examples):
        alone_inputs[i, :len(example.tokens) - 1] = example.tokens[:-1]
    alone_positions = np.broadcast_to(np.arange(alone_inputs.shape[1], dtype=np.int32), packed["positions"].shape)
    alone_logits = np.concatenate([np.asarray(forward(alone_inputs[i:i + 2], alone_positions))
                                   for i in range(0, len(examples), 2)])
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.tokens) - 1
            alone = alone_logits[2 * r + row.index(example), :n]
            _assert_relative(logits[r, start:start + n], alone, 1e-5, f"row {r}, tokens {start}..{start + n}")
            if start:  # without segment ids the second example would see the first
                assert np.max(np.abs(unmasked[r, start:start + n] - alone)) > 0.1
            start += n
    assert np.isfinite(logits).all()  # padding queries attend to nothing: the sink keeps them finite


@pytest.mark.slow
def test_packed_batch_loss_and_lora_gradients_equal_padded():
    """The same six examples packed three to a row, or padded one per row: equal loss (sum of
    weighted token losses / sum of weights) and LoRA gradients (attention, experts, router)."""
    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)
    lc = lora_lib.LoraConfig(rank=4, alpha=8.0, router=True)
    lora = _random_adapters(config, lc)
    examples = _examples([16, 31, 20, 25, 18, 29], seed=1)
    packed = data_lib.fill_rows([examples[:3], examples[3:5], examples[5:]], 64, segments=True)
    padded = data_lib.fill_rows([[e] for e in examples], 64)
    assert packed["weights"].sum() == padded["weights"].sum() > 0

    @jax.jit
    def loss_and_grads(lora, micro):
        return jax.value_and_grad(lambda a: step_lib.loss_fn(config, params, a, lc, micro, loss_chunk=64))(lora)

    packed_loss, packed_grads = loss_and_grads(lora, packed)
    padded_loss, padded_grads = loss_and_grads(lora, padded)
    np.testing.assert_allclose(float(packed_loss), float(padded_loss), rtol=1e-5)
    # Gradients to 1e-3 of their largest entry: this random model with 0.3-scale adapters amplifies
    # rounding (1e-7 relative noise on attention's outputs moves them by 1.5e-4), and blockwise
    # attention sums a packed row's keys in another order than a padded one's (measured: 7e-5).
    # Attention leaking across the packed examples moves every gradient by 290% or more.
    for path, grad in jax.tree_util.tree_leaves_with_path(padded_grads):
        assert np.max(np.abs(grad)) > 0, path
        _assert_relative(_tree_get(packed_grads, path), grad, 1e-3, jax.tree_util.keystr(path))


def _tree_get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


PACKING_LINES = (
    [{"messages": [{"role": "user", "content": f"Question {i}: " + "and more " * (i % 5 * 2)},
                   {"role": "assistant", "channel": "final", "content": f"Answer {i * 7}" + " indeed" * (i % 3)}]}
     for i in range(14)]
    + [{"text": "a"}, {"text": "long " * 100}])


def _check_packed_step(batches, step):
    """Each row holds its plan's examples in order: tokens[:-1] as inputs, tokens[1:] as targets,
    positions from 0, segment ids 1, 2, ..., the example's own mask[1:] as weights; then padding."""
    batch, plan = batches.batch(step), batches.plan(step)
    for r, indices in enumerate(plan):
        micro, row = divmod(r, batches.batch_size)
        got = {k: v[micro, row] for k, v in batch.items()}
        start = 0
        examples = [e for e in (batches.dataset.example(i) for i in indices) if len(e.tokens) > 1]
        for segment, example in enumerate(examples, start=1):
            n = len(example.tokens) - 1
            span = slice(start, start + n)
            np.testing.assert_array_equal(got["segments"][span], segment)
            np.testing.assert_array_equal(got["positions"][span], np.arange(n))
            np.testing.assert_array_equal(got["inputs"][span], example.tokens[:-1])
            np.testing.assert_array_equal(got["targets"][span], example.tokens[1:])
            np.testing.assert_array_equal(got["weights"][span], example.mask[1:])
            start += n
        assert (got["segments"][start:] == 0).all() and (got["positions"][start:] == -1).all()
        assert (got["weights"][start:] == 0).all() and (got["inputs"][start:] == batches.pad_id).all()
    return plan


def test_packing_loader_is_deterministic_and_resumes_exactly(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in PACKING_LINES))
    dataset = data_lib.Dataset(path, seq_len=64, vocab_size=201088)
    settings = {"batch_size": 2, "accumulation": 2, "seed": 3, "pad_id": 199999}
    batches = data_lib.Batches(dataset, packing=True, **settings)
    plans = [_check_packed_step(batches, step) for step in range(6)]
    assert dataset.truncated == 1
    # the shuffled stream, in order (several epochs), nothing skipped or repeated
    rows = [row for plan in plans for row in plan]
    stream = data_lib.Batches(dataset, batch_size=1, seed=3)
    assert [i for row in rows for i in row] == [stream.plan(p)[0][0] for p in range(batches.position(6))]
    assert batches.position(6) > 6 * batches.rows_per_step  # more than one example per row
    # greedy: each row is closed only when the next example does not fit
    size = lambda i: max(len(dataset.example(i).tokens) - 1, 0)  # noqa: E731
    for row, following in zip(rows, rows[1:]):
        assert sum(map(size, row)) + size(following[0]) > 64

    fresh = data_lib.Batches(dataset, packing=True, **settings)
    resumed = data_lib.Batches(dataset, packing=True, **settings)
    resumed.seek(3, batches.position(3))
    for step in (3, 5, 4):
        for other in (fresh, resumed):
            assert other.plan(step) == plans[step]
            jax.tree.map(np.testing.assert_array_equal, other.batch(step), batches.batch(step))
    parts = [data_lib.Batches(dataset, packing=True, process_index=i, process_count=2, **settings).batch(4)
             for i in range(2)]
    for key, whole in batches.batch(4).items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), whole)
    with pytest.raises(ValueError, match="does not match step 2"):
        data_lib.Batches(dataset, **settings).seek(2, 9)


def test_segments_with_a_kv_cache_are_an_error():
    from gptoss_jax import cache
    from gptoss_jax.model import build
    from gptoss_jax.ops import attention

    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)
    tokens = jnp.zeros((1, 4), jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    kv_cache = cache.init_cache(config, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="segments .* not supported with a KV cache"):
        build(config, params)(tokens, positions, kv_cache, segments=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="both q_segments and k_segments"):
        attention.visible(positions, positions, None, q_segments=jnp.ones((1, 4), jnp.int32))


# ---------------------------------------------------------------------------------------------
# the finetune command

TINY_HARMONY_CONFIG = {  # tiny-a's shapes with the real vocabulary, so that harmony tokens fit
    **json.loads((REPO / "configs" / "tiny-a.json").read_text()), "vocab_size": 201088, "hidden_size": 32,
    "eos_token_id": 200002, "pad_token_id": 199999}


def _write_run(tmp_path: Path, name: str, steps: int, **train) -> Path:
    model_config = tmp_path / "tiny-harmony.json"
    model_config.write_text(json.dumps(TINY_HARMONY_CONFIG))
    data = tmp_path / "chats.jsonl"
    if not data.exists():
        lines = [json.dumps({"messages": [{"role": "user", "content": f"Say the number {i}."},
                                          {"role": "assistant", "channel": "final", "content": f"{i * 7}"}]})
                 for i in range(10)]
        data.write_text("\n".join(lines[:4] + ['{"messages": 3}'] + lines[4:]) + "\n")
    settings = {"steps": steps, "output_dir": str(tmp_path / name), "checkpoint_every": 2, "keep_checkpoints": 2,
                "progress": False, "export": [], **train}
    run = tmp_path / f"{name}.toml"
    lines = ["[model]", f'path = "random:{model_config}"', 'dtype = "float32"', "[data]", f'path = "{data}"',
             "seq_len = 48", "batch_size = 2", "[lora]", "rank = 4", "alpha = 8.0", "[optim]",
             "learning_rate = 0.01", "warmup_steps = 2", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    run.write_text("\n".join(lines) + "\n")
    return run


KILLED_AFTER_STEP = """
import os, signal, sys
from gptoss_jax import cli
from gptoss_jax.train import loop

make_train_step = loop.step_lib.make_train_step


def killing(*args, **kwargs):  # SIGKILL (hard, uncatchable) as step {step} + 1 starts: step {step} is logged and saved
    train_step = make_train_step(*args, **kwargs)

    def step(state, batch):
        if int(state["step"]) == {step}:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(state, batch)

    return step


loop.step_lib.make_train_step = killing
sys.exit(cli.main(sys.argv[1:]))
"""
"""The finetune command, killed by the test's own hook (the library has none)."""


def _finished_checkpoints(directory: Path) -> list[int]:
    """The steps of the checkpoints Orbax finished writing in `directory` (not its temporary folders)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@contextlib.contextmanager
def _counting_train_steps(monkeypatch):
    """Records, for every train step `loop.finetune` takes, the step counter of the state it is given."""
    ran = []
    make = step_lib.make_train_step

    def counting(*args, **kwargs):
        train_step = make(*args, **kwargs)

        def step(state, batch):
            ran.append(int(state["step"]))
            return train_step(state, batch)

        return step

    with monkeypatch.context() as patch:
        patch.setattr(loop.step_lib, "make_train_step", counting)
        yield ran


@pytest.mark.slow
def test_finetune_killed_and_resumed_matches_uninterrupted(tmp_path, monkeypatch):
    """Killed (SIGKILL) after step 5, with checkpoints at 2 and 4: --resume restores step 4 and takes
    steps 5..8 only (the state's step counter 4..7), logging the uninterrupted run's losses (which a
    restart from step 0 would log too)."""
    steps = 8
    straight = loop.finetune(_write_run(tmp_path, "straight", steps, export=["peft", "merged"]))
    assert len(straight["losses"]) == steps and straight["skipped_lines"] == [5]
    out = Path(straight["output_dir"])
    assert (out / "loss.png").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
    assert len(list((out / "checkpoints").iterdir())) == 2  # keeps the last 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and rows[0]["tokens"] > 0

    run = _write_run(tmp_path, "killed", steps)
    env = subprocess_env()
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_STEP.format(step=5), "finetune", "--config", str(run)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    finished = _finished_checkpoints(checkpoints)  # every 2 steps, the last 2 kept; killed after step 5,
    assert finished in ([2, 4], [2]), finished  # maybe before step 4's asynchronous write was finalized
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]
    with pytest.raises(FileExistsError, match="--resume"):
        loop.finetune(run)
    with _counting_train_steps(monkeypatch) as ran:
        resumed = loop.finetune(run, resume=True)
    assert ran == list(range(finished[-1], steps))  # the state's step counter at each step taken: from the
    # latest checkpoint on (4..7 after checkpoint 4), never from 0
    assert resumed["step"] == steps and _finished_checkpoints(checkpoints) == [6, 8]
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)


def test_finetune_stops_on_nan_and_keeps_last_good_checkpoint(tmp_path):
    run = _write_run(tmp_path, "nan", 6, checkpoint_every=1)
    run.write_text(run.read_text().replace("learning_rate = 0.01", "learning_rate = 1e30")
                   .replace("warmup_steps = 2", "warmup_steps = 0"))
    with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 2; stopped\. Last good checkpoint: step 1 "):
        loop.finetune(run)
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == ["1"]


def test_finetune_with_packing_resumes_exactly(tmp_path, monkeypatch):
    """`packing = true`: the checkpointed data position (not steps x rows) restores the stream; a run
    resumed from step 2 logs the uninterrupted run's losses. A non-boolean setting is an error."""
    data = tmp_path / "texts.txt"
    rng = np.random.default_rng(0)
    data.write_text("".join("".join(rng.choice(list("abcdefgh "), n)) + "x\n" for n in rng.integers(8, 40, 15)))
    run = tmp_path / "packed.toml"
    run.write_text("\n".join([
        "[model]", 'path = "random:tiny-a"', 'dtype = "float32"',
        "[data]", f'path = "{data}"', 'tokenizer = "bytes"', "seq_len = 48", "batch_size = 2", "packing = true",
        "[lora]", "rank = 4", "alpha = 8.0", "[optim]", "learning_rate = 0.01", "warmup_steps = 1",
        "[train]", "steps = 4", f'output_dir = "{tmp_path / "out"}"', "checkpoint_every = 2", "progress = false",
        "export = []"]) + "\n")
    straight = loop.finetune(run)
    dataset = data_lib.Dataset(data, seq_len=48, vocab_size=301, tokenizer="bytes")
    assert data_lib.Batches(dataset, batch_size=2, packing=True).position(2) > 2 * 2  # packed: not steps x rows
    import shutil

    assert _finished_checkpoints(tmp_path / "out" / "checkpoints") == [2, 4]
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "4")
    with _counting_train_steps(monkeypatch) as ran:
        resumed = loop.finetune(run, resume=True)
    assert ran == [2, 3]  # resumed from checkpoint 2: only the remaining steps were taken
    assert len(resumed["losses"]) == 4
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)

    run.write_text(run.read_text().replace("packing = true", 'packing = "yes"'))
    with pytest.raises(ValueError, match="packing must be true or false"):
        loop.load_run_config(run)
