"""The CPU grouped expert matmul: the native kernel (`gptoss_jax.ops.native`) against the pure-JAX
tiles, side by side in one run, on the bench config's expert shapes; and the native unembedding
against XLA's.

    python benchmarks/bench_grouped_matmul.py [--config configs/bench.json] [--repeats 5]

Two tables: (1) 8-layer gate_up products at decode batch 1 and 16 (top-k experts per token, drawn
at random), float32 and bfloat16, with the expert-weight bandwidth each reaches; (2) one layer with
2-256 rows per expert, float32: where the kernel stops paying (`ops.matmul.NATIVE_MAX_ROWS_PER_GROUP`);
(3) the unembedding [vocab, hidden] at 1-32 rows, float32 and bfloat16 (as bits, as the model passes
it on CPU), native against `ops.matmul.unembed`'s XLA path (`ops.matmul.NATIVE_MAX_UNEMBED_ROWS`);
(4) MXFP4 experts of gpt-oss-20b's gate_up shape ([2880, 5760] x 32, one layer): the native MXFP4
kernel against the tiles at batch 1 and 8 and at 64 rows per expert (a 512-token prefill), with
the packed bytes per second. `--tables` picks some (default: all).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax.ops import bits, matmul, native  # noqa: E402
from gptoss_jax.quant import MXFP4Weight  # noqa: E402

REFERENCE = matmul._tiled_grouped_matmul  # (x, w, group_sizes, layer): the tiles, also the kernel's gradient


def _best_ms(fn, *args, repeats: int) -> float:
    times, _ = common.run_times(fn, *args, repeats=repeats)
    return 1e3 * min(times)


def _pair(w: jax.Array, layers: int, repeats: int, x: jax.Array, sizes: jax.Array) -> tuple[float, float, float]:
    """(native ms, tiled ms, max relative difference) for `layers` stacked products."""
    def total(product):
        return jax.jit(lambda x, w, s: sum(product(x, w, s, jnp.int32(l)).sum() for l in range(layers)))

    one = lambda x, w, s, l: native.grouped_matmul(x, w, s, l, reference=REFERENCE)  # noqa: E731
    got = np.asarray(jax.jit(one)(x, w, sizes, jnp.int32(layers - 1)))
    want = np.asarray(jax.jit(REFERENCE)(x, w, sizes, jnp.int32(layers - 1)))
    error = float(np.abs(got - want).max() / np.abs(want).max())
    return _best_ms(total(one), x, w, sizes, repeats=repeats), _best_ms(total(REFERENCE), x, w, sizes,
                                                                        repeats=repeats), error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(common.REPO / "configs" / "bench.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tables", default="dense,rows,unembed,mxfp4", help="comma-separated subset")
    args = parser.parse_args(argv)
    tables = set(args.tables.split(","))
    if not native.available():
        raise SystemExit("bench_grouped_matmul: the native kernels are not available (see the warning above)")
    config = gptoss_jax.load_config(args.config)
    layers, groups, k = config.num_layers, config.num_experts, config.experts_per_token
    d, out = config.hidden, 2 * config.intermediate
    rng = np.random.default_rng(0)
    w32 = jnp.asarray(rng.standard_normal((layers, groups, d, out), np.float32) * d ** -0.5) \
        if tables & {"dense", "rows"} else None
    common.log(f"{config.name}: {layers} layers x {groups} experts of [{d}, {out}] (gate_up), top-{k}")

    if "mxfp4" in tables:
        _mxfp4_table(gptoss_jax.load_config("gpt-oss-20b"), rng, args.repeats)
    rows = []
    for batch in (1, 16) if "dense" in tables else ():
        experts = np.sort(np.concatenate([rng.choice(groups, k, replace=False) for _ in range(batch)]))
        sizes = jnp.asarray(np.bincount(experts, minlength=groups).astype(np.int32))
        x = jnp.asarray(rng.standard_normal((batch * k, d), np.float32))
        used = int((np.asarray(sizes) > 0).sum())
        for name, w in (("float32", w32), ("bfloat16", w32.astype(jnp.bfloat16))):
            ours, tiles, error = _pair(w, layers, args.repeats, x, sizes)
            gb = layers * used * d * out * w.dtype.itemsize / 1e9
            rows.append([f"batch {batch}, {name} ({used} experts)", f"{ours:.1f}", f"{tiles:.1f}",
                         f"{tiles / ours:.2f}x", f"{gb / ours * 1e3:.1f}", f"{gb / tiles * 1e3:.1f}", f"{error:.1e}"])
    if rows:
        print()
        common.print_table(rows, [10, 10, 9, 13, 13, 10],
                           ["", "native ms", "tiled ms", "speedup", "native GB/s", "tiled GB/s", "rel diff"])

    rows = []
    for per in (2, 4, 8, 16, 64, 256) if "rows" in tables else ():
        sizes = jnp.full((groups,), per, jnp.int32)
        x = jnp.asarray(rng.standard_normal((per * groups, d), np.float32))
        ours, tiles, error = _pair(w32[:1], 1, args.repeats, x, sizes)
        rows.append([f"{per} rows per expert", f"{ours:.1f}", f"{tiles:.1f}", f"{tiles / ours:.2f}x", f"{error:.1e}"])
    if rows:
        print()
        common.print_table(rows, [10, 10, 9, 10], ["one layer, float32", "native ms", "tiled ms", "speedup", "rel diff"])
        print(f"\nthe model takes the kernel up to {matmul.NATIVE_MAX_ROWS_PER_GROUP} rows per expert on average")
    if "unembed" in tables:
        _unembed_table(config, d, rng, args.repeats)


def _unembed_table(config: gptoss_jax.Config, d: int, rng: np.random.Generator, repeats: int) -> None:
    rows = []
    table32 = jnp.asarray(rng.standard_normal((config.vocab_size, d), np.float32) * d ** -0.5)
    for name, table in (("float32", table32), ("bfloat16", bits.as_bits(table32.astype(jnp.bfloat16)))):
        reference = functools.partial(matmul.unembed, valid=None)
        xla = jax.jit(lambda x, t: _without_native_unembed(reference, x, t))
        # x rounded to the table's dtype first, as `ops.matmul.unembed` does
        ours = jax.jit(lambda x, t: native.unembed(x.astype(bits.value_dtype(t)), t, reference=None))
        for m in (1, 4, 8, 16, 32):
            x = jnp.asarray(rng.standard_normal((m, d), np.float32))
            want, got = np.asarray(xla(x, table)), np.asarray(ours(x, table))
            error = float(np.abs(got - want).max() / np.abs(want).max())
            a, b = _best_ms(ours, x, table, repeats=repeats), _best_ms(xla, x, table, repeats=repeats)
            rows.append([f"{name}, {m} rows", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}x", f"{error:.1e}"])
    print()
    common.print_table(rows, [10, 10, 9, 10], [f"unembedding [{config.vocab_size}, {d}]", "native ms", "XLA ms",
                                               "speedup", "rel diff"])
    print(f"\nthe model takes the native unembedding up to {matmul.NATIVE_MAX_UNEMBED_ROWS} rows")


def _mxfp4_table(config: gptoss_jax.Config, rng: np.random.Generator, repeats: int) -> None:
    """Table (4): one layer of `config`'s gate_up experts in MXFP4, native kernel against the tiles."""
    groups, k, d, out = config.num_experts, config.experts_per_token, config.hidden, 2 * config.intermediate
    w = MXFP4Weight.random(jax.random.key(0), jax.random.key(1), (groups, d, out))
    native_one = jax.jit(lambda x, b, s, g: native.mxfp4_grouped_matmul(x, b, s, g, None, reference=None))
    tiled_one = jax.jit(lambda x, b, s, g: matmul._tiled_mxfp4(x, b, s, g, None))
    expert_bytes = (w.blocks.size + w.scales.size) // groups
    rows = []
    for label, batch, per in (("batch 1", 1, None), ("batch 8", 8, None), ("64 rows per expert", None, 64)):
        if per is None:
            experts = np.sort(np.concatenate([rng.choice(groups, k, replace=False) for _ in range(batch)]))
            sizes = np.bincount(experts, minlength=groups).astype(np.int32)
        else:
            sizes = np.full(groups, per, np.int32)
        x = jnp.asarray(rng.standard_normal((int(sizes.sum()), d), np.float32))
        args = (x, w.blocks, w.scales, jnp.asarray(sizes))
        got, want = np.asarray(native_one(*args)), np.asarray(tiled_one(*args))
        error = float(np.abs(got - want).max() / np.abs(want).max())
        a, b = _best_ms(native_one, *args, repeats=repeats), _best_ms(tiled_one, *args, repeats=repeats)
        gb = int((sizes > 0).sum()) * expert_bytes / 1e9
        rows.append([f"{label} ({int((sizes > 0).sum())} experts)", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}x",
                     f"{gb / a * 1e3:.1f}", f"{error:.1e}"])
    print()
    common.print_table(rows, [10, 10, 9, 13, 10], [f"MXFP4 gate_up [{d}, {out}] x {groups}, one layer",
                                                   "native ms", "tiled ms", "speedup", "native GB/s", "rel diff"])
    print(f"(native MXFP4 decode: {native.mxfp4_decode()})")


def _without_native_unembed(unembed, x: jax.Array, table: jax.Array) -> jax.Array:
    """`ops.matmul.unembed` as it runs where the native kernel does not apply (traced with it off)."""
    limit, matmul.NATIVE_MAX_UNEMBED_ROWS = matmul.NATIVE_MAX_UNEMBED_ROWS, 0
    try:
        return unembed(x, table)
    finally:
        matmul.NATIVE_MAX_UNEMBED_ROWS = limit


if __name__ == "__main__":
    main()
