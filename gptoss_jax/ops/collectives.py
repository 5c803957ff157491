"""Collectives whose implementation depends on the platform: the native op on GPU / TPU, a stand-in on CPU.

XLA:CPU cannot execute the native ragged all-to-all, so here the platform XLA lowers for decides
(`jax.lax.platform_dependent`), whatever `ops.platform.lowering_for` says: a CPU test traced for
TPU (`lowering_for("tpu")`: the ragged-all-to-all MoE exchange) runs the stand-in, an export for
TPU or CUDA holds the native op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptoss_jax.ops import platform


def has_native_ragged_all_to_all() -> bool:
    """Whether every platform traced for (`ops.platform.targets()`) has a native ragged all-to-all
    (GPU, TPU; XLA:CPU's stand-in moves worst-case slots: more bytes than an all-gather)."""
    return platform.on_accelerators()


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array, send_sizes: jax.Array,
                      output_offsets: jax.Array, recv_sizes: jax.Array, *, axis_name: str,
                      axis_size: int) -> jax.Array:
    """`jax.lax.ragged_all_to_all` (same arguments); on CPU, `_emulated_ragged_all_to_all`."""
    native = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name)
    emulated = functools.partial(_emulated_ragged_all_to_all, axis_name=axis_name, axis_size=axis_size)
    return jax.lax.platform_dependent(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                      cpu=emulated, default=native)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name: str, axis_size: int):
    """ragged_all_to_all's semantics from a dense all_to_all of fixed-size slots (XLA:CPU has no
    ragged-all-to-all). A slot holds the largest possible chunk: min(operand rows, output rows)."""
    slot = min(operand.shape[0], output.shape[0])
    lanes = jnp.arange(slot)
    rows = jnp.minimum(input_offsets[:, None] + lanes, operand.shape[0] - 1)
    sending = (lanes < send_sizes[:, None]).reshape(*rows.shape, *(1,) * (operand.ndim - 1))
    slots = jnp.where(sending, operand[rows], 0)  # [peers, slot, ...]
    received = jax.lax.all_to_all(slots, axis_name, 0, 0, tiled=True)
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # senders' offsets into me
    target = jnp.where(lanes < recv_sizes[:, None], offsets[:, None] + lanes, output.shape[0])
    return output.at[target.reshape(-1)].set(received.reshape(axis_size * slot, *operand.shape[1:]),
                                             mode="drop")
