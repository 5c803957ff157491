"""The platforms a program is traced for: the one input of every strategy and kernel choice in `ops`.

A choice made while tracing (attention's backend, the MoE exchange, which grouped matmul) must
follow the platform the program will be *lowered for*, not the host that traces it: exporting for
TPU from a CPU machine must trace the TPU program. So every choice asks `targets()`:

- by default, the default backend's platform (what `jax.jit` on this machine lowers for);
- inside `lowering_for(*platforms)`, those platforms: give it the platforms you pass to
  `jax.export(..., platforms=...)`, or use it on CPU to run (and test) another platform's branches
  where XLA:CPU can execute them (`lowering_for("tpu")`: `ragged_dot`, the ragged-all-to-all MoE
  exchange).

The value is a `jax.make_user_context`, part of jit's cache key: a function traced for one target is
traced again for another.

`select(cpu=..., default=...)` is the one way `ops` picks a branch: with a single target (the
default backend's, or one `lowering_for` platform) it calls that target's branch directly (traced
for it alone, so it runs wherever XLA can execute it, and a CPU program never traces, differentiates
and lowers the accelerator branch as well: a tiny model's train step had 664 of its 6,294
operations there); with several platforms exported at once it defers to
`jax.lax.platform_dependent`, which XLA resolves per platform at lowering. Export for another
platform under `lowering_for` (without it, a CPU host traces the CPU branches). What XLA:CPU cannot
execute at all (the native ragged all-to-all) stays under `platform_dependent` whatever the
override: see `ops.collectives`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax

_TARGETS = jax.make_user_context(default_value=None)
"""The platforms `lowering_for` names (None: the default backend's)."""

ACCELERATORS = frozenset({"tpu", "cuda", "rocm", "gpu"})
"""Platform names that are not the CPU (jax.default_backend() says "gpu" for CUDA and ROCm)."""

KNOWN = ACCELERATORS | {"cpu"}


def lowering_for(*platforms: str) -> contextlib.AbstractContextManager:
    """Inside, every `ops` choice is made for `platforms` (e.g. those given to `jax.export`) rather
    than for the default backend. `lowering_for()` (no platforms) restores the default."""
    for name in platforms:
        if name not in KNOWN:
            raise ValueError(f"unknown platform {name!r} (one of {', '.join(sorted(KNOWN))})")
    return _TARGETS(tuple(dict.fromkeys(platforms)) or None)


def targets() -> tuple[str, ...]:
    """The platforms being traced for: `lowering_for`'s, else the default backend's."""
    return _TARGETS.value or (jax.default_backend(),)


def overridden() -> bool:
    """Whether `lowering_for` names the targets (rather than the default backend)."""
    return _TARGETS.value is not None


def only(platform: str) -> bool:
    """Whether every target is `platform` ("gpu" matches cuda / rocm / gpu)."""
    return all(_family(p) == _family(platform) for p in targets())


def on_accelerators() -> bool:
    """Whether no target is the CPU."""
    return all(p in ACCELERATORS for p in targets())


def _family(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def select(*args: Any, cpu: Callable[..., Any], default: Callable[..., Any]) -> Any:
    """cpu(*args) when lowering for the CPU, else default(*args) (see the module docstring)."""
    if len(targets()) == 1:
        return (cpu if targets() == ("cpu",) else default)(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)
