"""What the model does on a mesh: `gptoss_jax.ops.parallel`'s Distribution, for our meshes.

Registered when `gptoss_jax.sharding` is imported; the core asks `ops.parallel.current()` and gets
a `MeshDistribution` for the mesh set with `jax.set_mesh` (None when it spans one device). A mesh
with axes other than `MESH_AXES` is refused here, by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from gptoss_jax.axes import Axes
from gptoss_jax.sharding import moe, rules
from gptoss_jax.sharding.mesh import MESH_AXES, axis_sizes


@dataclasses.dataclass(frozen=True)
class MeshDistribution:
    """The rules (`rules.RULES`) on a mesh of these axis sizes (all of `MESH_AXES`)."""

    axis_sizes: tuple[tuple[str, int], ...]

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.axis_sizes)

    def constrain(self, x: jax.Array, logical: Axes) -> jax.Array:
        """Sharding constraint on activation x by logical axis names (see `rules.activation_spec`)."""
        return jax.lax.with_sharding_constraint(x, rules.activation_spec(logical, x.shape, self.sizes))

    def constrain_tree(self, tree: Any, logical: Any) -> Any:
        """`constrain` on each leaf of tree; `logical` is the same tree with axis-name tuples as leaves."""
        return jax.tree.map(lambda axes, x: self.constrain(x, axes), logical, tree,
                            is_leaf=lambda a: isinstance(a, tuple))

    def route(self, x: jax.Array, router: Any, router_bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
        return moe.route(x, router, router_bias, top_k, sizes=self.sizes)

    def experts(self, x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: Any,
                gate_up_bias: jax.Array, down: Any, down_bias: jax.Array, *, alpha: float, limit: float,
                layer: jax.Array | None) -> jax.Array:
        return moe.experts(x, expert_ids, expert_weights, gate_up, gate_up_bias, down, down_bias,
                           sizes=self.sizes, alpha=alpha, limit=limit, layer=layer)


    def per_shard(self, fn: Any, args: tuple[jax.Array, ...], logical: tuple[Axes, ...],
                  tied: tuple[tuple[int, int], ...] = ()) -> jax.Array:
        """`ops.parallel.per_shard`: fn inside `jax.shard_map`, each argument split by
        `rules.activation_spec` of its logical axes, the output like args[0]."""
        specs = [list(rules.activation_spec(axes, a.shape, self.sizes)) for a, axes in zip(args, logical, strict=True)]
        if len({repr(specs[i][d]) for i, d in tied}) > 1:  # split differently: replicate them all
            for i, d in tied:
                specs[i][d] = None
        in_specs = tuple(P(*spec) for spec in specs)
        return jax.shard_map(fn, in_specs=in_specs, out_specs=in_specs[0], check_vma=False)(*args)


def distribution_for(mesh: Any) -> MeshDistribution | None:
    """The distribution for `mesh` (None for one device); ValueError for axes the rules do not know."""
    sizes = axis_sizes(mesh)
    if math.prod(sizes.values()) == 1:
        return None
    return MeshDistribution(tuple((name, sizes[name]) for name in MESH_AXES))
