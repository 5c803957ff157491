"""Every platform-dependent choice, behind plain functions (model code calls these, never names a platform).

- `platform`: the platforms being traced for (the default backend's, or `platform.lowering_for`'s:
  an export for TPU / CUDA from a CPU host, or a CPU test of another platform's branches); every
  choice below asks it.
- `parallel`: the one reader of the mesh context (`jax.set_mesh`); what `gptoss_jax.sharding` plugs in.
- `bits`: bfloat16 weights passed to jitted steps as their raw bits on CPU.
- `matmul`: projections, the unembedding, the grouped expert matmul; typed weights (quantized,
  LoRA-adapted) are read here.
- `attention`: rotary embeddings and attention with sinks (`blockwise`, pure JAX; `splash`, the TPU kernel).
- `mxfp4`: the MXFP4 matmul kernel (pure JAX).
- `native`: native CPU kernels (`cpu_kernels.cc` through `jax.ffi`, built on first use): the grouped
  expert matmul over float32 / bfloat16 weights read in place.
- `collectives`: ragged all-to-all (native, or a stand-in on CPU).
"""
