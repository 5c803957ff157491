"""Quantized weights as typed pytrees: each format is one class holding its packed arrays.

A quantized weight stands where a dense matrix W [..., in, out] would (a param leaf of the model,
a node of the params pytree). It knows its parts' logical axes (from W's), how to decode itself
(`dequantize`) and its matmul, so params, checkpoints, sharding, LoRA and `ops.matmul` handle every
format through the type. A new format (int8, fp8) is one class here plus its kernel in `ops/`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax import mxfp4 as mxfp4_codec
from gptoss_jax.axes import Axes
from gptoss_jax.ops import mxfp4 as mxfp4_kernel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXFP4Weight:
    """An MXFP4 matrix W [..., in, out] kept packed (OCP microscaling: e2m1 values, e8m0 scales).

    blocks uint8 [..., out, 16, in/32] and scales uint8 [..., out, in/32]: the released layout with
    the 16 bytes of a block moved before the block index (see `gptoss_jax.ops.mxfp4`)."""

    blocks: Any
    scales: Any

    FORMAT = "mxfp4"

    @staticmethod
    def part_axes(axes: Axes) -> MXFP4Weight:
        """Logical axes of each part, from W's (..., in, out): the blocks of `in` keep its name."""
        *lead, fan_in, out = axes
        return MXFP4Weight(blocks=(*lead, out, "mxfp4_bytes", fan_in), scales=(*lead, out, fan_in))

    @staticmethod
    def part_shapes(shape: tuple[int, ...]) -> MXFP4Weight:
        """Shapes of the parts of a W of `shape` (..., in, out)."""
        *lead, fan_in, out = shape
        groups = fan_in // mxfp4_codec.BLOCK_SIZE
        return MXFP4Weight(blocks=(*lead, out, mxfp4_codec.BLOCK_BYTES, groups), scales=(*lead, out, groups))

    @property
    def shape(self) -> tuple[int, ...]:
        """W's dense shape (..., in, out)."""
        *lead, out, _, groups = self.blocks.shape
        return (*lead, groups * mxfp4_codec.BLOCK_SIZE, out)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """W [..., in, out] decoded exactly (tests, export, dequantize-at-load; the model never builds it)."""
        return mxfp4_kernel.dense_matrix(self.blocks, self.scales, dtype)

    def matmul(self, x: jax.Array, index: tuple[Any, ...] = ()) -> jax.Array:
        """x [rows, in] @ W[index] -> float32 [rows, out], decoding a few rows of W at a time."""
        return mxfp4_kernel.matmul(x, self.blocks, self.scales, index)

    @staticmethod
    def random(code_key: jax.Array, scale_key: jax.Array, shape: tuple[int, ...]) -> MXFP4Weight:
        """Random codes for a W of `shape` (..., in, out), scales near fan_in ** -0.5 / rms(e2m1 codes)."""
        parts = MXFP4Weight.part_shapes(shape)
        fan_in = shape[-2]
        blocks = jax.random.randint(code_key, parts.blocks, 0, 256, jnp.int32).astype(jnp.uint8)
        exponent = round(127 + math.log2(fan_in ** -0.5 / 2.93))  # 2.93: rms of the 16 e2m1 values
        scales = exponent + jax.random.randint(scale_key, parts.scales, -1, 2, jnp.int32)
        return MXFP4Weight(blocks, scales.astype(jnp.uint8))


FORMATS: dict[str, type] = {"mxfp4": MXFP4Weight}
"""`Config.expert_format` values other than "dense" -> their weight type."""

QuantizedWeight = MXFP4Weight
"""Any quantized weight type (a union as formats are added)."""


def is_quantized(x: Any) -> bool:
    """Whether x is a quantized weight (of any format)."""
    return isinstance(x, tuple(FORMATS.values()))
