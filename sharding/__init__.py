"""Running gpt-oss on a device mesh: expert and tensor parallelism, data / FSDP for training.

    from gptoss_jax import sharding
    mesh = sharding.make_mesh("expert=4,tensor=2")          # the CLI's --mesh; -1: the rest
    params = gptoss_jax.init_params(config, seed, mesh=mesh)  # or load_model(dst, mesh=mesh)
    with jax.set_mesh(mesh):                                  # the model finds the mesh here
        logits = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))(params, tokens)

- `mesh.py`: mesh specs -> `jax.sharding.Mesh` with axes (data, fsdp, expert, tensor), Auto types.
- `rules.py`: the one table from logical axis names to mesh axes, its collision check, the presets,
  `param_shardings` / `partition_specs`, `cache_specs` (the KV cache), `activation_spec`.
- `distribution.py`: what the model does on a mesh (activation constraints, the sharded MoE),
  plugged into `gptoss_jax.ops.parallel` when this package is imported.
- `moe.py`: the experts in `jax.shard_map`: all-gather or ragged all-to-all exchange, grouped
  matmuls on the local experts, tensor parallelism over the expert intermediate dimension.

Mesh axis names appear in this package only; the model names logical axes.
"""

from gptoss_jax.ops import parallel as _parallel
from gptoss_jax.sharding.distribution import MeshDistribution, distribution_for
from gptoss_jax.sharding.mesh import MESH_AXES, axis_sizes, describe, make_mesh, mesh_shape, parse_mesh_spec
from gptoss_jax.sharding.moe import moe_strategy
from gptoss_jax.sharding.rules import (
    PRESETS,
    RULES,
    activation_spec,
    cache_specs,
    check_config,
    check_no_collision,
    param_shardings,
    partition_specs,
    weight_spec,
)

_parallel.register(distribution_for, param_shardings)

__all__ = [
    "MESH_AXES", "PRESETS", "RULES", "MeshDistribution", "activation_spec", "axis_sizes", "cache_specs",
    "check_config", "check_no_collision", "describe", "distribution_for", "make_mesh", "mesh_shape",
    "moe_strategy", "param_shardings", "parse_mesh_spec", "partition_specs", "weight_spec",
]
