"""Native CPU kernels (`cpu_kernels.cc`, an XLA FFI library): built on first use, optional.

The library is compiled once per machine with the C++ compiler found (`$CXX`, else `g++` / `c++`),
`-O3 -march=native`, into `$GPTOSS_JAX_NATIVE_CACHE` (default `~/.cache/gptoss-jax/native`; written
to a temporary name, then renamed), keyed by the source, the jaxlib version and the CPU's flags.
Without a compiler, or if the build fails, `available()` is False (said once in the log) and `ops`
keeps its pure-JAX paths; `GPTOSS_JAX_NATIVE=0` turns the kernels off.

`grouped_matmul` is `ops.matmul.grouped_matmul`'s CPU forward for plain float32 / bfloat16 expert
weights (and, as one group, bfloat16 projections'), `mxfp4_grouped_matmul` its forward for MXFP4
experts (`cpu_mxfp4.cc`), `unembed` `ops.matmul.unembed`'s for a few rows; their gradients are the
pure-JAX paths'.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform as host
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.ops import bits

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_kernels.cc", "cpu_unembed.cc", "cpu_mxfp4.cc"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_simd.h", "cpu_pool.h", "cpu_amx.h"))
TARGETS = {"gptoss_grouped_matmul": "GptossGroupedMatmul", "gptoss_unembed": "GptossUnembed",
           "gptoss_mxfp4_grouped_matmul": "GptossMxfp4GroupedMatmul"}
"""XLA custom-call targets -> the library's handler symbols."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return host.processor()


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


def _extra_flags() -> list[str]:
    """`$GPTOSS_JAX_NATIVE_FLAGS`: compiler flags after `-march=native` (the tests build the portable
    paths with `-mno-avx2`)."""
    return os.environ.get("GPTOSS_JAX_NATIVE_FLAGS", "").split()


def _build(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        command = [compiler, "-O3", "-march=native", *_extra_flags(), "-std=c++17", "-shared", "-fPIC", "-w",
                   f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(partial), "-lpthread"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)


_loaded: list[ctypes.CDLL] = []


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernels are built, loaded and registered with XLA (building them if needed)."""
    if os.environ.get("GPTOSS_JAX_NATIVE", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("gptoss-jax: no C++ compiler found ($CXX, g++, c++, clang++): CPU expert matmuls "
                    "take the slower pure-JAX path")
        return False
    import jaxlib

    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in SOURCES + HEADERS),
                                     jaxlib.__version__.encode(), compiler.encode(), _cpu_flags().encode(),
                                     " ".join(_extra_flags()).encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("GPTOSS_JAX_NATIVE_CACHE", Path.home() / ".cache" / "gptoss-jax" / "native"))
    library = cache / f"cpu_kernels-{key}.so"
    try:
        if not library.exists():
            log.info("gptoss-jax: building the native CPU kernels (once per machine) into %s", library)
            _build(compiler, library)
        handle = ctypes.cdll.LoadLibrary(str(library))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
        _loaded.append(handle)
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("gptoss-jax: native CPU kernels unavailable (%s): CPU expert matmuls take the slower "
                    "pure-JAX path", error)
        return False
    return True


def mxfp4_decode() -> str:
    """How the built MXFP4 kernel decodes codes: "avx2" (byte shuffles into registers) or "portable"
    (one code at a time, into a buffer). Needs `available()`."""
    _require()
    return "avx2" if _loaded[-1].GptossMxfp4Avx2() else "portable"


def supports(w: Any, ndim: tuple[int, ...] = (3, 4)) -> bool:
    """Whether the kernels take this weight: a plain float32 / bfloat16 / bfloat16-bits array of
    `ndim` dimensions (`grouped_matmul`'s: 3 or 4; `unembed`'s table: 2)."""
    return isinstance(w, jax.Array) and w.dtype in (jnp.float32, jnp.bfloat16, jnp.uint16) and w.ndim in ndim


def _require() -> None:
    if not available():
        raise RuntimeError("the native CPU kernels are not available (the log says why); check "
                           "gptoss_jax.ops.native.available() before calling them")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, layer: jax.Array | None,
                   reference: Callable[..., jax.Array]) -> jax.Array:
    """x [m, in] grouped by group_sizes [g] times w [g, in, out] (or [layers, g, in, out] at `layer`)
    -> float32 [m, out], zero past the last group. Under bfloat16 weights (or their bits) x is taken
    rounded to bfloat16, as the MoE passes it (CPUs with AMX then multiply bfloat16 tiles).
    `reference(x, w, group_sizes, layer)` computes the same in pure JAX: its derivative is this
    one's. Needs `available()`."""
    _require()
    if bits.value_dtype(w) == jnp.bfloat16:
        x = x.astype(jnp.bfloat16)
    return _product(reference, x, w, group_sizes, layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(reference: Callable[..., jax.Array], x: jax.Array, w: jax.Array, group_sizes: jax.Array,
             layer: jax.Array | None) -> jax.Array:
    del reference
    stacked = w if layer is not None else w[None]
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call("gptoss_grouped_matmul", jax.ShapeDtypeStruct((x.shape[0], w.shape[-1]), jnp.float32))
    return call(x.astype(jnp.float32), stacked, index, group_sizes.astype(jnp.int32))


def _forward(reference: Callable[..., jax.Array], x: jax.Array, w: jax.Array, group_sizes: jax.Array,
             layer: jax.Array | None) -> tuple[jax.Array, tuple]:
    return _product(reference, x, w, group_sizes, layer), (x, w, group_sizes, layer)


def _backward(reference: Callable[..., jax.Array], saved: tuple, dy: jax.Array) -> tuple:
    x, w, group_sizes, layer = saved
    dx, dw = jax.vjp(lambda x, w: reference(x, w, group_sizes, layer), x, w)[1](dy)
    return dx, dw, None, None


_product.defvjp(_forward, _backward)


def unembed(x: jax.Array, table: jax.Array, reference: Callable[..., jax.Array],
            valid: jax.Array | None = None) -> jax.Array:
    """x [m, d] @ table [v, d].T -> float32 [m, v], the table read once; rows where `valid` bool [m]
    is False are skipped (zero). Under a bfloat16 table (or its bits) x is taken rounded to bfloat16,
    as `ops.matmul.unembed` passes it, so that CPUs with bfloat16 dot products (AVX512-BF16) multiply
    the table as it is. `reference(x, table)` computes the same in pure JAX: its derivative is this
    one's. Needs `available()`."""
    _require()
    valid = jnp.ones(x.shape[:1], jnp.int32) if valid is None else valid.astype(jnp.int32)
    if bits.value_dtype(table) == jnp.bfloat16:
        x = x.astype(jnp.bfloat16)
    return _unembed(reference, x, table, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _unembed(reference: Callable[..., jax.Array], x: jax.Array, table: jax.Array, valid: jax.Array) -> jax.Array:
    del reference
    call = jax.ffi.ffi_call("gptoss_unembed", jax.ShapeDtypeStruct((x.shape[0], table.shape[0]), jnp.float32))
    return call(x.astype(jnp.float32), table, valid)


def _unembed_forward(reference: Callable[..., jax.Array], x: jax.Array, table: jax.Array,
                     valid: jax.Array) -> tuple[jax.Array, tuple]:
    return _unembed(reference, x, table, valid), (x, table, valid)


def _unembed_backward(reference: Callable[..., jax.Array], saved: tuple, dy: jax.Array) -> tuple:
    x, table, valid = saved
    dx, dtable = jax.vjp(reference, x, table)[1](jnp.where(valid[:, None] != 0, dy, 0.0))
    return dx, dtable, None


_unembed.defvjp(_unembed_forward, _unembed_backward)


def mxfp4_grouped_matmul(x: jax.Array, blocks: jax.Array, scales: jax.Array, group_sizes: jax.Array,
                         layer: jax.Array | None, reference: Callable[..., jax.Array],
                         int8_activations: bool = False) -> jax.Array:
    """x [m, in] grouped by group_sizes [g] times the MXFP4 matrices blocks uint8 [(layers,) g, out, 16,
    in/32] / scales uint8 [(layers,) g, out, in/32] (`ops.mxfp4`'s layout; at `layer` when stacked)
    -> float32 [m, out], zero past the last group; the codes are decoded as they are read.
    `reference(x, blocks, scales, group_sizes, layer)` computes the same in pure JAX: its derivative in x is this
    one's. With `int8_activations`, groups of at most 4 rows take x quantized per block of 32 to int8
    (Q8_0, as llama.cpp does; `Config.expert_activations`). Needs `available()`."""
    _require()
    return _mxfp4_product(reference, int8_activations, x, blocks, scales, group_sizes, layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mxfp4_product(reference: Callable[..., jax.Array], int8_activations: bool, x: jax.Array, blocks: jax.Array,
                   scales: jax.Array, group_sizes: jax.Array, layer: jax.Array | None) -> jax.Array:
    del reference
    stacked = layer is not None
    index = jnp.asarray(layer if stacked else 0, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call("gptoss_mxfp4_grouped_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], blocks.shape[-3]), jnp.float32))
    return call(x.astype(jnp.float32), blocks if stacked else blocks[None], scales if stacked else scales[None],
                index, group_sizes.astype(jnp.int32), int8_activations=np.int32(int8_activations))


def _mxfp4_forward(reference: Callable[..., jax.Array], int8_activations: bool, x: jax.Array, blocks: jax.Array,
                   scales: jax.Array, group_sizes: jax.Array, layer: jax.Array | None) -> tuple[jax.Array, tuple]:
    return (_mxfp4_product(reference, int8_activations, x, blocks, scales, group_sizes, layer),
            (x, blocks, scales, group_sizes, layer))


def _mxfp4_backward(reference: Callable[..., jax.Array], int8_activations: bool, saved: tuple,
                    dy: jax.Array) -> tuple:
    x, blocks, scales, group_sizes, layer = saved
    (dx,) = jax.vjp(lambda x: reference(x, blocks, scales, group_sizes, layer), x)[1](dy)
    return dx, None, None, None, None


_mxfp4_product.defvjp(_mxfp4_forward, _mxfp4_backward)
