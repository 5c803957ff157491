"""Logical axis names and the axis tables of weights, adapters and the KV cache (a leaf: no imports).

Model code names dimensions by these logical names only; `gptoss_jax.sharding` alone maps them to
mesh axes. Each weight's own axes are declared with the weight in `model.py`; the tables here are
the ones several layers share (the model, the sharding rules, LoRA, the cache).

    weights      layers, embed, q_heads, kv_heads, head_dim, experts, router_experts, expert_mlp,
                 vocab; mxfp4_bytes (the 16 bytes of an MXFP4 block); lora_rank, lora_embed
    activations  batch, seq, act_embed, act_vocab
    KV cache     cache_batch, cache_slots, cache_kv_heads (and layers, head_dim)
"""

from __future__ import annotations

Axes = tuple[str | None, ...]

LAYERS = "layers"
"""The leading axis of stacked per-layer-pair weights (and of the cache's keys and values)."""

EXPERT_MATRICES = ("gate_up", "down")
"""The per-expert matrices; a scan over layers passes them whole (read in place, see `ops.matmul`)."""

ATTENTION_MATRICES = ("q", "k", "v", "o")
"""The attention projections; a scan over layers hands them on as views of the stack (`ops.bits.LayerView`)."""

EXPERT_AXES: dict[str, Axes] = {
    "gate_up": ("experts", "embed", "expert_mlp"),  # [e, d, 2i]: gate (even) and up (odd) interleaved
    "down": ("experts", "expert_mlp", "embed"),  # [e, i, d]
}
"""Logical axes of the expert matrices [experts, in, out], whatever their format (see `quant.py`)."""

LORA_AXES: dict[str, dict[str, Axes]] = {
    "gate_up": {"a": ("experts", "lora_embed", "lora_rank"), "b": ("experts", "lora_rank", "expert_mlp")},
    "down": {"a": ("experts", "expert_mlp", "lora_rank"), "b": ("experts", "lora_rank", "lora_embed")},
}
"""Logical axes of one layer's per-expert LoRA factors (`a` [e, in, r], `b` [e, r, out])."""

CACHE_AXES: dict[str, Axes] = {
    "k": (LAYERS, "cache_batch", "cache_kv_heads", "cache_slots", "head_dim"),
    "v": (LAYERS, "cache_batch", "cache_kv_heads", "cache_slots", "head_dim"),
    "positions": ("cache_batch", "cache_slots"),
}
"""Logical axes of each leaf of one kind's KV cache (see `cache.py`)."""

TOKENS: Axes = ("batch", "seq", "act_embed")
"""Activations [b, t, d] of the residual stream."""
