"""The one place that reads the device mesh: what runs differently when a mesh is set.

A mesh reaches the model through JAX's own context (`with jax.set_mesh(mesh):`), and only this
module looks at it. What to do on a mesh (logical axes -> mesh axes, the expert-parallel MoE) is
`gptoss_jax.sharding`'s, which plugs itself in with `register` when imported (`import gptoss_jax`
imports it): the core never imports `gptoss_jax.sharding`.

`current()` is None on one device (no mesh, a one-device mesh, or inside a `shard_map` body, where
the code is per-device). A mesh whose axes the registered rules do not know is an error, never a
silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax

from gptoss_jax.axes import Axes


class Distribution(Protocol):
    """How the model runs on the mesh in context (implemented by `gptoss_jax.sharding`)."""

    def constrain(self, x: jax.Array, logical: Axes) -> jax.Array: ...

    def constrain_tree(self, tree: Any, logical: Any) -> Any: ...

    def route(self, x: jax.Array, router: Any, router_bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]: ...

    def experts(self, x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, gate_up: Any,
                gate_up_bias: jax.Array, down: Any, down_bias: jax.Array, *, alpha: float, limit: float,
                layer: jax.Array | None) -> jax.Array: ...

    def per_shard(self, fn: Callable[..., jax.Array], args: tuple[jax.Array, ...], logical: tuple[Axes, ...],
                  tied: tuple[tuple[int, int], ...] = ()) -> jax.Array: ...


_factory: Callable[[Any], Distribution | None] | None = None
_param_shardings: Callable[[Any, Any], Any] | None = None


def register(factory: Callable[[Any], Distribution | None], param_shardings: Callable[[Any, Any], Any]) -> None:
    """Installs `factory(abstract mesh) -> Distribution | None` (None: the mesh spans one device) and
    `param_shardings(config, mesh) -> pytree of NamedSharding shaped like the params`."""
    global _factory, _param_shardings
    _factory, _param_shardings = factory, param_shardings


def _registered() -> None:
    if _factory is None:
        raise RuntimeError("a device mesh is used but gptoss_jax.sharding is not imported: "
                           "`import gptoss_jax.sharding` (or `import gptoss_jax`) first")


def current() -> Distribution | None:
    """The distribution for the mesh set with `jax.set_mesh`, or None when the code runs on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:  # no mesh, or inside a shard_map body: per-device code
        return None
    _registered()
    return _factory(mesh)


def param_shardings(config: Any, mesh: Any) -> Any:
    """Where each weight of `config` lives on `mesh` (NamedShardings shaped like the params)."""
    _registered()
    return _param_shardings(config, mesh)


def constrain(x: jax.Array, logical: Axes) -> jax.Array:
    """Sharding hint on activation x by logical axis names; x itself on one device."""
    distribution = current()
    return x if distribution is None else distribution.constrain(x, logical)


def per_shard(fn: Callable[..., jax.Array], args: tuple[jax.Array, ...], logical: tuple[Axes, ...],
              tied: tuple[tuple[int, int], ...] = ()) -> jax.Array:
    """fn(*args) computed per device on each device's shards of `args` (split by their logical axes
    as activations are), its result shaped and split like args[0]: for a kernel that must see whole
    local arrays (a Pallas call). `tied`: (argument, dimension) pairs that must be split alike (a
    kernel's query heads and KV heads); where the rules would split them differently, none of them
    is split. fn(*args) itself on one device."""
    distribution = current()
    return fn(*args) if distribution is None else distribution.per_shard(fn, args, logical, tied)


def constrain_tree(tree: Any, logical: Any) -> Any:
    """`constrain` on each leaf of `tree`, with `logical` the same tree of axis-name tuples."""
    distribution = current()
    return tree if distribution is None else distribution.constrain_tree(tree, logical)
