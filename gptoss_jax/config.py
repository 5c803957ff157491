"""The model configuration: one frozen dataclass, read from Hugging Face `config.json` files.

`load_config("gpt-oss-20b")` reads a config shipped in `configs/`; `load_config("path/to/config.json")`
or `load_config("path/to/checkpoint_dir")` reads a Hugging Face (or converted) checkpoint's config.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
EXPERT_FORMATS = ("dense", "mxfp4")
EXPERT_ACTIVATIONS = ("float", "int8")


@dataclasses.dataclass(frozen=True)
class Config:
    """gpt-oss hyperparameters. Field names follow the model's math; `to_hf_dict` gives HF's names."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    intermediate: int
    vocab_size: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_positions: int = 4096
    rope_truncate: bool = False
    max_positions: int = 131072
    rms_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    expert_format: str = "dense"
    """How the expert matrices are held: "dense" (the params' float dtype) or "mxfp4" (packed e2m1
    blocks + e8m0 scales, as released, dequantized tile by tile inside the compiled model)."""
    expert_activations: str = "float"
    """How MXFP4 experts take their input on CPU: "float" (float32, exact against the dequantized
    weights), or "int8": in decode (at most 4 rows per expert) each row quantized per block of 32 to
    int8 with a float scale, as llama.cpp does (Q8_0; relative error ~0.5% per expert product, see
    `ops.cpu_mxfp4.cc`); faster, off by default. A runtime choice: not saved with a checkpoint. With
    "int8" a token's result depends on whether its expert sees more than 4 rows in that step (those
    stay float), so the engine's same-tokens-whatever-the-other-slots guarantee holds in "float" only."""

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"config {self.name!r}: {msg}")

        for field in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                      "experts_per_token", "intermediate", "vocab_size", "sliding_window"):
            if getattr(self, field) <= 0:
                fail(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            fail(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            fail(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.experts_per_token > self.num_experts:
            fail(f"experts_per_token ({self.experts_per_token}) > num_experts ({self.num_experts})")
        if self.expert_format not in EXPERT_FORMATS:
            fail(f"expert_format must be one of {EXPERT_FORMATS}, got {self.expert_format!r}")
        if self.expert_activations not in EXPERT_ACTIVATIONS:
            fail(f"expert_activations must be one of {EXPERT_ACTIVATIONS}, got {self.expert_activations!r}")
        if self.expert_format == "mxfp4" and (self.hidden % 32 or self.intermediate % 32):
            fail(f"mxfp4 experts need hidden ({self.hidden}) and intermediate ({self.intermediate}) to be "
                 "multiples of the 32-value block")
        if len(self.layer_types) != self.num_layers:
            fail(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        expected = tuple((SLIDING, FULL)[i % 2] for i in range(self.num_layers))
        if self.num_layers % 2 or self.layer_types != expected:
            fail("gpt-oss layers alternate sliding_attention (even) and full_attention (odd) and come in "
                 f"pairs; got {self.num_layers} layers of types {self.layer_types}")

    @property
    def num_layer_pairs(self) -> int:
        """Number of (sliding, full) layer pairs: the length of the scanned layer stack."""
        return self.num_layers // 2

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """This config as a Hugging Face `config.json` dictionary (model_type gpt_oss)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab_size,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "original_max_position_embeddings": self.rope_original_max_positions,
                "truncate": self.rope_truncate,
            },
            "initial_context_length": self.rope_original_max_positions,
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_eps,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


def from_hf_dict(hf: dict[str, Any], name: str = "gpt-oss", source: str = "<dict>") -> Config:
    """Builds a Config from a Hugging Face gpt-oss `config.json` dictionary.

    Accepts both rope layouts transformers has written (`rope_scaling` + `rope_theta`, and the newer
    `rope_parameters` holding `rope_theta`). Raises ValueError naming `source` for anything that is
    not a gpt-oss config.
    """
    if hf.get("model_type") != "gpt_oss":
        raise ValueError(f"{source}: not a gpt-oss config (model_type={hf.get('model_type')!r}, "
                         "expected 'gpt_oss')")
    if hf.get("tie_word_embeddings", False):
        raise ValueError(f"{source}: gpt-oss has untied embeddings; tie_word_embeddings=true is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
        raise ValueError(f"{source}: gpt-oss uses YaRN rotary embeddings, got rope_type={rope.get('rope_type')!r}")
    try:
        num_layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types") or [(SLIDING, FULL)[i % 2] for i in range(num_layers)]
        num_heads = int(hf["num_attention_heads"])
        return Config(
            name=name,
            num_layers=num_layers,
            hidden=int(hf["hidden_size"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
            num_experts=int(hf["num_local_experts"]),
            experts_per_token=int(hf.get("num_experts_per_tok") or hf["experts_per_token"]),
            intermediate=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            sliding_window=int(hf["sliding_window"]),
            layer_types=tuple(layer_types),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 150000.0))),
            rope_factor=float(rope.get("factor", 32.0)),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 4096)),
            # transformers truncates the YaRN correction range unless told otherwise.
            rope_truncate=bool(rope.get("truncate", True)),
            max_positions=int(hf.get("max_position_embeddings", 131072)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
            eos_token_id=_first_id(hf.get("eos_token_id"), 200002),
            pad_token_id=_first_id(hf.get("pad_token_id"), 199999),
            # not a transformers key: written by `convert --keep-mxfp4` into the converted config.json
            expert_format=str(hf.get("expert_format", "dense")),
        )
    except KeyError as missing:
        raise ValueError(f"{source}: gpt-oss config is missing key {missing}") from None
    except ValueError as bad:
        raise ValueError(f"{source}: {bad}") from None


def _first_id(value: Any, default: int) -> int:
    if value is None:
        return default
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def builtin_config_names() -> list[str]:
    """Names of the configs shipped in `configs/` (e.g. `gpt-oss-20b`, `tiny-a`)."""
    files = importlib.resources.files("gptoss_jax.configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_config(name_or_path: str | os.PathLike) -> Config:
    """Loads a config by built-in name (`gpt-oss-20b`), `config.json` path, or checkpoint directory."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        name = path.parent.name if path.name == "config.json" else path.stem
        return from_hf_dict(hf, name=name, source=str(path))
    name = str(name_or_path)
    resource = importlib.resources.files("gptoss_jax.configs") / f"{name}.json"
    if not resource.is_file():
        raise FileNotFoundError(f"no config {name!r}: not a file or directory, and not a built-in config "
                                f"(built-in: {', '.join(builtin_config_names())})")
    return from_hf_dict(json.loads(resource.read_text()), name=name, source=f"configs/{name}.json")


def yarn_inv_freq_and_scale(config: Config) -> tuple[list[float], float]:
    """YaRN inverse frequencies ([head_dim // 2]) and the cos/sin scale, as transformers computes them."""
    d, theta = config.head_dim, config.rope_theta

    def correction_dim(rotations: float) -> float:
        return d * math.log(config.rope_original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    inv_freq = []
    for i in range(d // 2):
        freq = theta ** (2 * i / d)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        inv_freq.append(ramp / (config.rope_factor * freq) + (1 - ramp) / freq)
    scale = 0.1 * math.log(config.rope_factor) + 1.0 if config.rope_factor > 1 else 1.0
    return inv_freq, scale
