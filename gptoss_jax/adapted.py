"""LoRA as an interceptor: an adapted weight is a typed pytree that stands where the weight was.

`attach(params, adapters)` is the one interception point: each adapted weight W of the params is
replaced by `Adapted(W, a, b)`, and `ops.matmul` reads an `Adapted` weight as W plus the low-rank
update `(x @ a) @ b`, never forming `a @ b` (the router, [d, e], is merged). Module signatures do
not change and know nothing of LoRA.

The adapters tree (what `gptoss_jax.train.lora.model_adapters` makes) is shaped like the params it
adapts: {"layers": {"sliding" | "full": {"attn": {"q": {"a", "b"}, ..., "dropout": {"key", "rate"}},
"mlp": {"router" | "gate_up" | "down": {"a", "b"}}}}}, `b` with the LoRA scale folded in, float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

ATTENTION_ORDER = ("q", "k", "v", "o")
"""Attention projections in the order their dropout masks are numbered."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """W (an array or a quantized weight) with LoRA factors a [..., *in, r] and b [..., r, *out].

    `dropout_key` / `dropout_rate` (or None): inverted dropout of the adapter's input, one mask per
    weight (attention only, as peft)."""

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: jax.Array | None = None

    @property
    def dtype(self) -> Any:
        """The dtype of the base weight."""
        return self.base.dtype

    def at_layer(self, index: jax.Array, read: Any) -> Adapted:
        """Layer `index` of stacked adapters, the base left stacked (an expert matrix read in place
        by layer; its small factors are sliced, so their gradients stay one layer's size)."""
        return jax.tree.map(lambda leaf: read(leaf, index), dataclasses.replace(self, base=None)).with_base(self.base)

    def with_base(self, base: Any) -> Adapted:
        return dataclasses.replace(self, base=base)


def attach(params: dict[str, Any], adapters: dict[str, Any] | None) -> dict[str, Any]:
    """params with every weight that `adapters` adapts wrapped as `Adapted` (the one interception point)."""
    if not adapters:
        return params

    def walk(node: Any, adapter: Any) -> Any:
        if not isinstance(adapter, dict):
            return node
        if set(adapter) == {"a", "b"} and not isinstance(node, dict):
            return Adapted(node, adapter["a"], adapter["b"])
        out = dict(node)
        for key, sub in adapter.items():
            if key == "dropout":
                continue
            if key not in node:
                raise ValueError(f"LoRA adapter {key!r} has no weight to adapt (weights here: {sorted(node)})")
            out[key] = walk(node[key], sub)
        if "dropout" in adapter:  # attention: one dropout mask per adapted projection
            for index, name in enumerate(ATTENTION_ORDER):
                if isinstance(out.get(name), Adapted):
                    key = jax.vmap(jax.random.fold_in, in_axes=(0, None))(adapter["dropout"]["key"], index)
                    out[name] = dataclasses.replace(out[name], dropout_key=key,
                                                    dropout_rate=adapter["dropout"]["rate"])
        return out

    return walk(params, adapters)
