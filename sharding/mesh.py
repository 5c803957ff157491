"""Device meshes from a short spec: `make_mesh("data=2,expert=2,tensor=2")`.

Every mesh this package builds has the same four axes, in this order (outermost first):

    data    pure data parallelism: batch split, weights replicated
    fsdp    data parallelism with weights split along `embed` (training; all-gathered per layer)
    expert  expert parallelism: each shard owns num_experts / expert experts; the batch is also
            split over it outside the experts (attention runs data-parallel over the expert group)
    tensor  tensor parallelism: attention heads, the experts' intermediate dimension, the vocabulary

Axes the spec leaves out have size 1, so the rules in `rules.py` see one set of names whatever the
machine. Devices are laid out with the last axis varying fastest: `tensor` and `expert` neighbours
sit on the same host (NVLink / ICI), `data` spans hosts.

Axis types are `Auto` on purpose (jax 0.10's `jax.make_mesh` defaults to `Explicit`): the model
code is written once for one device and names no mesh axes, so the partitioner has to propagate
shardings through it from the weights and from a few logical-name constraints. Explicit axes would
put shardings into the types and make every einsum with a sharded contraction demand an
`out_sharding`, i.e. mesh knowledge in the model. The one place that needs exact control (the
experts) uses `jax.shard_map`, which is the same under either axis type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")
"""The mesh axes, outermost first. Only `gptoss_jax.sharding` names them."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=2,expert=-1" -> {"data": 2, "expert": -1}. Empty spec: {} (one device per mesh).

    At most one axis may be -1 ("the rest of the devices"); unknown or repeated axes and sizes
    that are not positive integers raise ValueError naming the spec.
    """
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if size == 0 or size < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1, got {size}")
        sizes[name] = size
    if sum(size == -1 for size in sizes.values()) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1 (the rest of the devices)")
    return sizes


def mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
    """All four axis sizes for `spec` on `num_devices` devices (-1 resolved, missing axes 1)."""
    sizes = parse_mesh_spec(spec)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    rest = [name for name, size in sizes.items() if size == -1]
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: the fixed axes need a multiple of {fixed} devices, "
                             f"but there are {num_devices}, so {rest[0]}=-1 has no integer size")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh spec {spec!r} needs {fixed} devices, but there are {num_devices}; "
                         "make the sizes multiply to the device count, or use -1 for one axis")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str = "", devices: Sequence[jax.Device] | None = None, *, local: bool = False) -> Mesh:
    """A mesh with axes `MESH_AXES` (Auto axis types) over `devices`.

    `devices` defaults to every process's devices (`jax.devices()`: call
    `jax.distributed.initialize` first on several hosts), or this process's alone with `local=True`.
    The spec must use all of them: "expert=4,tensor=2" on 8 devices, "data=-1,tensor=8" on any
    multiple of 8.
    """
    if devices is None:
        devices = jax.local_devices() if local else jax.devices()
    devices = list(devices)
    shape = mesh_shape(spec, len(devices))
    if devices[0].platform != "tpu":
        # jax orders GPU/CPU devices by process already; make it explicit so that `data` (outermost)
        # is the axis that crosses hosts. TPUs keep jax's topology-aware order.
        devices.sort(key=lambda d: (d.process_index, d.id))
    return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def axis_sizes(mesh: Mesh | jax.sharding.AbstractMesh | dict[str, int]) -> dict[str, int]:
    """{axis: size} for every axis in MESH_AXES (1 for axes the mesh lacks); ValueError for a mesh
    with axes this package does not know."""
    shape = dict(mesh) if isinstance(mesh, dict) else dict(mesh.shape)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh has axes {sorted(unknown)} that gptoss_jax.sharding does not know; "
                         f"build meshes with gptoss_jax.sharding.make_mesh (axes {MESH_AXES})")
    return {name: int(shape.get(name, 1)) for name in MESH_AXES}


def describe(mesh: Mesh | dict[str, int]) -> str:
    """The spec string of a mesh, axes of size 1 left out: "expert=4,tensor=2" ("" for one device)."""
    return ",".join(f"{name}={size}" for name, size in axis_sizes(mesh).items() if size > 1)
