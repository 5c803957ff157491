"""LoRA adapters for gpt-oss: declaration, initialization, merge, and the PEFT file format.

Adapters live in their own pytree, shaped like the layer params they adapt (stacked over layer
pairs, `sliding` / `full`), always float32, whatever the base weights' dtype:

    {"layers": {"sliding" | "full": {
        "attn": {"q" | "k" | "v": {"a": [P, d, r], "b": [P, r, heads, h]},
                 "o": {"a": [P, heads, h, r], "b": [P, r, d]}},
        "mlp":  {"router": {"a": [P, d, r], "b": [P, r, e]},
                 "gate_up": {"a": [P, e, d, r], "b": [P, e, r, 2i]},     # one adapter per expert
                 "down":    {"a": [P, e, i, r], "b": [P, e, r, d]}}}}}

The update of a weight W (in the param layout of `params.py`) is `scale * a @ b` (per expert for the
experts), scale = alpha / rank (alpha / sqrt(rank) with rsLoRA). `a` starts random (uniform, bound
1/sqrt(fan_in), as peft's kaiming init), `b` at zero, so training starts from the base model.

`model_adapters` turns this tree into what `gptoss_jax.model.forward(..., lora=)` takes (scale folded
into `b`, dropout keys added). PEFT: `to_peft` / `from_peft` map it to and from peft's tensor names
and layouts (`target_modules` q/k/v/o_proj; `target_parameters` `mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, `mlp.router.weight`, peft's `ParamWrapper`), so `save_peft` writes an
adapter that `peft.PeftModel.from_pretrained` loads onto transformers' `GptOssForCausalLM`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import Config
from gptoss_jax.params import Params, flatten, unflatten

ATTENTION_TARGETS = ("q", "k", "v", "o")
EXPERT_TARGETS = ("gate_up", "down")
KINDS = ("sliding", "full")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get adapters, and their rank, alpha and dropout.

    `dropout` applies to the attention adapters' inputs only (as in peft, which refuses dropout on
    `target_parameters`: an expert's input is not materialized per expert)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    attention: tuple[str, ...] = ATTENTION_TARGETS
    experts: tuple[str, ...] = EXPERT_TARGETS
    router: bool = False
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("attention", ATTENTION_TARGETS), ("experts", EXPERT_TARGETS)):
            bad = set(getattr(self, name)) - set(allowed)
            if bad:
                raise ValueError(f"LoRA {name} targets {sorted(bad)} unknown (allowed: {', '.join(allowed)})")
        object.__setattr__(self, "attention", tuple(self.attention))
        object.__setattr__(self, "experts", tuple(self.experts))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LoraConfig:
        check_settings(cls, raw, "LoRA")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def check_settings(cls: type, raw: Mapping[str, Any], what: str) -> None:
    """ValueError naming the keys of `raw` (a config file's section) that are not fields of dataclass `cls`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - fields
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)} (known: {', '.join(sorted(fields))})")


def _shapes(config: Config, lc: LoraConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...], int]]:
    """{(group, target): (a shape, b shape, fan_in)} for one layer (no layer-pair axis)."""
    d, n, k, h, e, i, r = (config.hidden, config.num_heads, config.num_kv_heads, config.head_dim,
                           config.num_experts, config.intermediate, lc.rank)
    table = {
        ("attn", "q"): ((d, r), (r, n, h), d),
        ("attn", "k"): ((d, r), (r, k, h), d),
        ("attn", "v"): ((d, r), (r, k, h), d),
        ("attn", "o"): ((n, h, r), (r, d), n * h),
        ("mlp", "router"): ((d, r), (r, e), d),
        ("mlp", "gate_up"): ((e, d, r), (e, r, 2 * i), d),
        ("mlp", "down"): ((e, i, r), (e, r, d), i),
    }
    wanted = [("attn", t) for t in lc.attention] + [("mlp", t) for t in lc.experts]
    if lc.router:
        wanted.append(("mlp", "router"))
    return {key: table[key] for key in wanted}


def init_lora(config: Config, lc: LoraConfig, seed: int = 0) -> Params:
    """Fresh adapters: `a` uniform in +-1/sqrt(fan_in), `b` zero (so the model starts unchanged)."""
    pairs = config.num_layer_pairs
    flat = {}
    key = jax.random.PRNGKey(seed)
    for kind in KINDS:
        for (group, target), (a_shape, b_shape, fan_in) in _shapes(config, lc).items():
            key, sub = jax.random.split(key)
            bound = 1.0 / math.sqrt(fan_in)
            flat[("layers", kind, group, target, "a")] = jax.random.uniform(
                sub, (pairs, *a_shape), jnp.float32, -bound, bound)
            flat[("layers", kind, group, target, "b")] = jnp.zeros((pairs, *b_shape), jnp.float32)
    return unflatten(flat)


def abstract_lora(config: Config, lc: LoraConfig) -> Params:
    """`init_lora`'s tree as jax.ShapeDtypeStruct (nothing allocated)."""
    return jax.eval_shape(lambda: init_lora(config, lc))


def model_adapters(lora: Params, lc: LoraConfig, dropout_key: jax.Array | None = None) -> Params:
    """What `forward(..., lora=)` takes: `b` scaled by `lc.scale`; with `dropout_key` and a nonzero
    dropout, each layer's attention gets its own dropout key (inside jit: traced)."""
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, x: x * lc.scale if str(getattr(path[-1], "key", "")) == "b" else x, lora)
    if dropout_key is None or lc.dropout == 0.0 or not lc.attention:
        return scaled
    layers = dict(scaled["layers"])
    pairs = next(iter(jax.tree.leaves(lora))).shape[0]
    for j, kind in enumerate(KINDS):
        keys = jax.random.split(jax.random.fold_in(dropout_key, j), pairs)
        attn = dict(layers[kind]["attn"])
        attn["dropout"] = {"key": keys, "rate": jnp.full((pairs,), lc.dropout, jnp.float32)}
        layers[kind] = {**layers[kind], "attn": attn}
    return {**scaled, "layers": layers}


# ---------------------------------------------------------------------------------------------
# merge

def merge(config: Config, params: Params, lora: Params, lc: LoraConfig) -> Params:
    """The base params with every adapter folded in (W + scale * a @ b, computed in float32 and
    stored in W's dtype): a plain model for `forward`, `export_checkpoint`, serving."""
    flat, adapters = flatten(params), flatten(lora)
    merged = dict(flat)
    for path in {p[:-1] for p in adapters}:
        a, b = adapters[(*path, "a")], adapters[(*path, "b")] * lc.scale
        _, kind, group, target = path
        if target in EXPERT_TARGETS:
            delta = jnp.einsum("lexr,lery->lexy", a, b)
        else:
            delta = _low_rank_product(a, b)
        weight = flat[("layers", kind, group, target)]
        merged[("layers", kind, group, target)] = (weight.astype(jnp.float32) + delta).astype(weight.dtype)
    return unflatten(merged)


def _low_rank_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [P, *in, r] @ b [P, r, *out] -> [P, *in, *out]."""
    pairs, rank = a.shape[0], a.shape[-1]
    product = jnp.einsum("pxr,pry->pxy", a.reshape(pairs, -1, rank), b.reshape(pairs, rank, -1))
    return product.reshape(*a.shape[:-1], *b.shape[2:])


# ---------------------------------------------------------------------------------------------
# PEFT format

_PEFT_PREFIX = "base_model.model.model.layers"
_ATTN_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_EXPERT_PARAMETERS = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"}
ROUTER_PARAMETER = "mlp.router.weight"


def _expert_module_names(targets: Sequence[str]) -> dict[str, str]:
    """peft nests one ParamWrapper per targeted parameter of `mlp.experts`, in `target_parameters`
    order: the first is innermost (`experts.base_layer.lora_*`), the last outermost."""
    return {t: "mlp.experts" + ".base_layer" * (len(targets) - 1 - j) for j, t in enumerate(targets)}


def adapter_config(lc: LoraConfig, base_model: str = "") -> dict[str, Any]:
    """peft's adapter_config.json for these adapters."""
    target_parameters = [_EXPERT_PARAMETERS[t] for t in lc.experts] + ([ROUTER_PARAMETER] if lc.router else [])
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout, "use_rslora": lc.rslora,
            "target_modules": [_ATTN_MODULES[t] for t in lc.attention] or None,
            "target_parameters": target_parameters or None, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_dora": False, "modules_to_save": None}


PEFT_INERT_OPTIONS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config",  # metadata and loading switches
    "megatron_core", "qalora_group_size",  # read only with megatron_config / use_qalora (refused below)
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",  # read only by init_lora_weights' methods
    "ensure_weight_tying",  # read only with modules_to_save / trainable_token_indices (refused below)
})
"""adapter_config.json keys that do not change what a loaded adapter computes."""

PEFT_UNSUPPORTED_OPTIONS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA) rescales the merged weight's columns"),
    "rank_pattern": ({}, "per-module ranks"),
    "alpha_pattern": ({}, "per-module alphas"),
    "layers_to_transform": (None, "adapters on some layers only"),
    "layers_pattern": (None, "adapters on some layers only"),
    "exclude_modules": (None, "adapters on some modules only"),
    "modules_to_save": (None, "fully trained copies of whole modules"),
    "trainable_token_indices": (None, "trained embedding rows"),
    "layer_replication": (None, "replicated layers"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a bias on lora_B"),
    "fan_in_fan_out": (False, "transposed (Conv1D) base weights"),
    "megatron_config": (None, "Megatron parallel layers"),
    "use_qalora": (False, "QALoRA's pooled adapter input"),
    "alora_invocation_tokens": (None, "activated LoRA (adapter on after invocation tokens only)"),
    "arrow_config": (None, "Arrow routing among adapters"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "velora_config": (None, "a LoRA variant"),
    "kasa_config": (None, "a LoRA variant"),
    "monteclora_config": (None, "a LoRA variant"),
}
"""peft (0.21) LoraConfig options this implementation does not have: {key: (peft's default, what it does)}.
A non-default value is refused, not ignored."""

PEFT_INIT_METHODS = (True, False, "gaussian", "eva", "orthogonal")
"""`init_lora_weights` values that only initialize lora_A / lora_B (so a saved adapter means what its
tensors say); others (pissa, olora, corda, loftq, mica, ...) also change the base weights or the
training rule."""


def _is_default(value: Any, default: Any) -> bool:
    """value equals default, counting None, False, {} and [] as the same empty setting."""
    def empty(v: Any) -> bool:
        return v is None or v is False or (isinstance(v, (dict, list)) and not v)

    return value == default or (empty(value) and empty(default))


def lora_config_from_peft(raw: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """LoraConfig from a peft adapter_config.json's dict (rank, alpha, dropout, rsLoRA, targets).

    ValueError naming the key and `source` for every option that would change the adapter's math and
    that this implementation lacks (DoRA, rank / alpha patterns, some layers only, modules_to_save,
    biases, base-modifying inits, unknown targets, ...): refused, never silently ignored."""
    def refuse(key: str, why: str) -> ValueError:
        return ValueError(f"{source}: peft option {key} = {raw[key]!r} is not supported ({why})")

    if raw.get("peft_type", "LORA") != "LORA":
        raise refuse("peft_type", "only LORA adapters")
    for key, (default, what) in PEFT_UNSUPPORTED_OPTIONS.items():
        if key in raw and not _is_default(raw[key], default):
            raise refuse(key, f"{what}; only {default!r} is")
    init = raw.get("init_lora_weights", True)
    if not any(init is m or (isinstance(m, str) and init == m) for m in PEFT_INIT_METHODS):
        raise refuse("init_lora_weights", f"only {', '.join(map(repr, PEFT_INIT_METHODS))}: other inits change the "
                                          "base weights or the training rule")
    known = PEFT_INERT_OPTIONS | set(PEFT_UNSUPPORTED_OPTIONS) | {
        "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "target_parameters", "init_lora_weights"}
    for key in sorted(set(raw) - known):
        if raw[key] not in (None, False, {}, [], ""):
            raise refuse(key, "an option unknown here (written by a newer peft?)")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise ValueError(f"{source}: no {key!r} (LoRA {'rank' if key == 'r' else 'alpha'})")

    modules = {v: k for k, v in _ATTN_MODULES.items()}
    target_modules = raw.get("target_modules") or []
    if isinstance(target_modules, str):
        raise refuse("target_modules", f"a pattern; only a list of module names from {sorted(modules)}")
    unknown = sorted(set(target_modules) - set(modules))
    if unknown:
        raise refuse("target_modules", f"modules {unknown} have no adapter here; only {sorted(modules)}")
    parameters = {v: k for k, v in _EXPERT_PARAMETERS.items()}
    target_parameters = list(raw.get("target_parameters") or [])
    unknown = sorted(set(target_parameters) - set(parameters) - {ROUTER_PARAMETER})
    if unknown:
        raise refuse("target_parameters", f"parameters {unknown} have no adapter here; only "
                                          f"{sorted(parameters) + [ROUTER_PARAMETER]}")
    if not target_modules and not target_parameters:
        raise ValueError(f"{source}: neither target_modules nor target_parameters: the adapter adapts nothing")
    attention = tuple(t for t in ATTENTION_TARGETS if _ATTN_MODULES[t] in target_modules)
    experts = tuple(parameters[p] for p in target_parameters if p in parameters)
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
                      attention=attention, experts=experts, router=ROUTER_PARAMETER in target_parameters,
                      rslora=bool(raw.get("use_rslora", False)))


def to_peft(config: Config, lora: Params, lc: LoraConfig) -> dict[str, np.ndarray]:
    """peft tensor names (as in adapter_model.safetensors) -> float32 arrays in peft's layouts.

    A relayout only (transposes, reshapes), so it maps gradients the same way as adapters."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(lora).items()}
    experts = _expert_module_names(lc.experts)
    out = {}
    for layer in range(config.num_layers):
        kind, pair = KINDS[layer % 2], layer // 2
        prefix = f"{_PEFT_PREFIX}.{layer}"

        def get(group: str, target: str) -> tuple[np.ndarray, np.ndarray]:
            return flat[("layers", kind, group, target, "a")][pair], flat[("layers", kind, group, target, "b")][pair]

        for t in lc.attention:  # torch Linear: lora_A [r, in], lora_B [out, r]
            a, b = get("attn", t)
            out[f"{prefix}.self_attn.{_ATTN_MODULES[t]}.lora_A.weight"] = a.reshape(-1, lc.rank).T
            out[f"{prefix}.self_attn.{_ATTN_MODULES[t]}.lora_B.weight"] = b.reshape(lc.rank, -1).T
        if lc.router:
            a, b = get("mlp", "router")
            out[f"{prefix}.mlp.router.lora_A.weight"] = a.T
            out[f"{prefix}.mlp.router.lora_B.weight"] = b.T
        for t in lc.experts:  # ParamWrapper on [e, in, out]: lora_A [e*r, in] (e-major), lora_B [out, r*e] (e-minor)
            a, b = get("mlp", t)  # [e, in, r], [e, r, out]
            e = a.shape[0]
            out[f"{prefix}.{experts[t]}.lora_A.weight"] = a.transpose(0, 2, 1).reshape(e * lc.rank, -1)
            out[f"{prefix}.{experts[t]}.lora_B.weight"] = b.transpose(2, 1, 0).reshape(b.shape[2], lc.rank * e)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_peft(config: Config, tensors: Mapping[str, np.ndarray], lc: LoraConfig) -> Params:
    """Inverse of `to_peft` (adapter names such as `.default` are dropped from the tensor names)."""
    tensors = {k.replace(".default.", "."): np.asarray(v, np.float32) for k, v in tensors.items()}
    shapes = _shapes(config, lc)
    experts = _expert_module_names(lc.experts)
    per_layer: dict[tuple[str, ...], list[np.ndarray]] = {}
    r = lc.rank
    for layer in range(config.num_layers):
        kind = KINDS[layer % 2]
        prefix = f"{_PEFT_PREFIX}.{layer}"
        for (group, target), (a_shape, b_shape, _) in shapes.items():
            if group == "attn":
                module = f"{prefix}.self_attn.{_ATTN_MODULES[target]}"
            elif target == "router":
                module = f"{prefix}.mlp.router"
            else:
                module = f"{prefix}.{experts[target]}"
            try:
                peft_a, peft_b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
            except KeyError as err:
                raise ValueError(f"PEFT adapter lacks tensor {err.args[0]!r}") from None
            if target in EXPERT_TARGETS:
                e = a_shape[0]
                a = peft_a.reshape(e, r, -1).transpose(0, 2, 1)
                b = peft_b.reshape(-1, r, e).transpose(2, 1, 0)
            else:
                a, b = peft_a.T.reshape(a_shape), peft_b.T.reshape(b_shape)
            if a.shape != a_shape or b.shape != b_shape:
                raise ValueError(f"PEFT tensor {module}: shapes {peft_a.shape}, {peft_b.shape} do not match "
                                 f"config {config.name!r} with rank {r}")
            per_layer.setdefault(("layers", kind, group, target, "a"), []).append(a)
            per_layer.setdefault(("layers", kind, group, target, "b"), []).append(b)
    return unflatten({k: jnp.asarray(np.stack(v)) for k, v in per_layer.items()})


def save_peft(directory: str | Path, config: Config, lora: Params, lc: LoraConfig, base_model: str = "") -> Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` (peft's format) to `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_peft(config, lora, lc), str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config(lc, base_model), indent=2) + "\n")
    return directory


def load_peft(directory: str | Path, config: Config) -> tuple[Params, LoraConfig]:
    """(adapters, LoraConfig) from a peft adapter directory (ours or peft's own `save_pretrained`)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    path = directory / "adapter_config.json"
    lc = lora_config_from_peft(json.loads(path.read_text()), source=str(path))
    return from_peft(config, load_file(str(directory / "adapter_model.safetensors")), lc), lc
