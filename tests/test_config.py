"""Configs: published values, Hugging Face config.json in both rope layouts, counts, bad input."""

import dataclasses
import json

import pytest
from conftest import FIXTURES

import gptoss_jax
from gptoss_jax import cli
from gptoss_jax.config import from_hf_dict, load_config
from gptoss_jax.params import count_params

# openai/gpt-oss-20b's config.json as published on the Hugging Face hub (quantization block kept).
PUBLISHED_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_builtin_20b_and_120b_have_the_published_values():
    small, large = load_config("gpt-oss-20b"), load_config("gpt-oss-120b")
    assert (small.num_layers, small.num_experts, large.num_layers, large.num_experts) == (24, 32, 36, 128)
    for c in (small, large):
        assert (c.hidden, c.intermediate, c.num_heads, c.num_kv_heads, c.head_dim) == (2880, 2880, 64, 8, 64)
        assert (c.experts_per_token, c.vocab_size, c.sliding_window, c.max_positions) == (4, 201088, 128, 131072)
        assert (c.rope_theta, c.rope_factor, c.rope_beta_fast, c.rope_beta_slow) == (150000, 32, 32, 1)
        assert (c.rope_original_max_positions, c.rope_truncate, c.rms_eps) == (4096, False, 1e-5)
        assert (c.swiglu_limit, c.swiglu_alpha, c.eos_token_id, c.pad_token_id) == (7.0, 1.702, 200002, 199999)
        assert c.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert dataclasses.replace(from_hf_dict(PUBLISHED_20B), name="gpt-oss-20b") == small


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_config_saved_by_transformers_loads_equal(name):
    """transformers 5 writes `rope_parameters` (theta inside); ours ship `rope_scaling` + `rope_theta`."""
    saved = json.loads((FIXTURES / name / "config.json").read_text())
    assert "rope_parameters" in saved
    assert load_config(FIXTURES / name) == dataclasses.replace(load_config(name), name=name)
    assert from_hf_dict(load_config(name).to_hf_dict(), name=name) == load_config(name)


@pytest.mark.parametrize("name, total, active", [("gpt-oss-20b", "20.91B", "3.61B"),
                                                 ("gpt-oss-120b", "116.83B", "5.13B")])
def test_info_reports_published_parameter_counts(name, total, active, capsys):
    assert cli.main(["info", name]) == 0
    assert f"{total} total, {active} active per token" in capsys.readouterr().out
    config = load_config(name)
    assert count_params(config) == closed_form_counts(config)  # declared shapes == closed form


def closed_form_counts(c) -> dict[str, int]:
    """Parameter counts written out from the architecture: `total`, and `active` per token (top-k
    experts, without the embedding)."""
    d, e = c.hidden, c.num_experts
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attention = d * q + q + 2 * (d * kv + kv) + q * d + d + c.num_heads
    router = d * e + e
    one_expert = d * 2 * c.intermediate + 2 * c.intermediate + c.intermediate * d + d
    per_layer = attention + router + 2 * d + e * one_expert
    embedding = c.vocab_size * d
    total = c.num_layers * per_layer + 2 * embedding + d
    inactive_experts = c.num_layers * (e - c.experts_per_token) * one_expert
    return {"total": total, "active": total - inactive_experts - embedding}


def test_param_counts_are_declared_shapes():
    config = load_config("tiny-a")
    params = gptoss_jax.init_params(config, seed=0)
    total = sum(x.size for x in __import__("jax").tree.leaves(params))
    assert count_params(config)["total"] == total


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "not a gpt-oss config"),
    ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({"layer_types": ["full_attention"] * 24}, "alternate"),
    ({"num_hidden_layers": 23, "layer_types": None}, "pairs"),
    ({"tie_word_embeddings": True}, "untied"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "YaRN"),
    ({"num_experts_per_tok": 40}, "experts_per_token"),
])
def test_bad_config_names_the_file_and_the_problem(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PUBLISHED_20B, **change}))
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_key_and_bad_json_and_unknown_name(tmp_path, capsys):
    broken = dict(PUBLISHED_20B)
    del broken["hidden_size"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="missing key 'hidden_size'"):
        load_config(tmp_path / "a")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "b.json")
    assert cli.main(["info", "gpt-oss-7b"]) == 2
    assert "gpt-oss-120b, gpt-oss-20b" in capsys.readouterr().err
