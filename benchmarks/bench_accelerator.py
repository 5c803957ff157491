"""One-shot accelerator benchmark: gpt-oss-20b with synthetic weights built on the device.

    python benchmarks/bench_accelerator.py            # ~8 min on one GPU / TPU chip
    python benchmarks/bench_accelerator.py --quick    # < 3 min: decode at batch 1 and 8, prefill at 4k
    python benchmarks/bench_accelerator.py --quick --config tiny-mxfp4 --batches 1,2 --prefill 64 \\
        --context 128                                 # CPU, seconds (tests/test_bench_accelerator.py)

For each expert format (bfloat16 and MXFP4 experts, `--formats`): random weights made on the default
device (`gptoss_jax.init_params`, nothing read from disk), then
- decode tok/s at each batch of `--batches` (`gptoss_jax.generate.decode_step`: one token per row
  per step, rows at position context / 2 of a `--context`-position KV cache);
- prefill tok/s at each length of `--prefill` (`gptoss_jax.generate.extend` of one row into an empty
  cache of that length);
- device memory in use at its peak (`Device.memory_stats()`; on CPU: the process's peak RSS);
- each rate as a fraction of its roofline: max(bytes / bandwidth, FLOPs / peak) per step, with
  the bandwidth from a measured on-device copy, the peak from a measured bfloat16 matmul, and the
  bytes and FLOPs per step from the declared shapes (`eval_shape`: `common.bytes_per_token`, and
  `flops_per_token` here).
Measurements past `--budget-seconds` are skipped (and listed), so one run fits a short device lease.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() (blocked until ready), after `warmup` calls."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return common.median(times)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of an on-device elementwise copy (x + 1: reads and writes nbytes each)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    add = jax.jit(lambda x: x + 1)
    return 2 * nbytes / _timed(lambda: add(x), repeats)


def matmul_peak(n: int, repeats: int = 5) -> float:
    """FLOP/s of a bfloat16 [n, n] @ [n, n] product (float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    product = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / _timed(lambda: product(a), repeats)


def flops_per_token(config: Any, context: float, logits: bool) -> float:
    """Matmul FLOPs one token costs at `context` keys: 2 x the weights it multiplies (top-k of the
    experts; the embedding is a lookup; the unembedding only with `logits`), plus attention's
    QK and PV products (4 x heads x head_dim per visible key, a sliding layer seeing <= window)."""
    import gptoss_jax
    from gptoss_jax.params import LAYER_AXIS

    dense = dataclasses.replace(config, expert_format="dense")
    params = 0.0
    for path, names, shape, nbytes in common.declared_bytes(gptoss_jax.logical_axes(dense),
                                                            gptoss_jax.abstract_params(dense)):
        count = nbytes / 2  # bfloat16
        own = tuple(n for n in names if n != LAYER_AXIS)
        key = tuple(map(common._key, path))
        if key == ("embed",) or len(own) < 2 or (key == ("unembed",) and not logits):
            continue  # lookups, biases, norms and sinks
        params += count * (config.experts_per_token / config.num_experts if "experts" in own else 1)
    sliding = sum(1 for kind in config.layer_types if kind == "sliding_attention")
    full = config.num_layers - sliding
    keys = sliding * min(config.sliding_window, context) + full * context
    return 2 * params + 4 * config.num_heads * config.head_dim * keys


def _peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return common.high_water_rss() if jax.default_backend() == "cpu" else None


def _roofline(seconds: float, nbytes: float, flops: float, bandwidth: float, peak: float) -> float:
    """The fraction of the roofline time (bytes / bandwidth or FLOPs / peak, the larger) measured."""
    return max(nbytes / bandwidth, flops / peak) / seconds


def bench_format(config: Any, args: argparse.Namespace, bandwidth: float, peak: float, deadline: float,
                 skipped: list[str]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    import importlib

    import gptoss_jax
    from gptoss_jax.ops import bits

    generate = importlib.import_module("gptoss_jax.generate")  # the module (the package exports a function of that name)

    fmt = "mxfp4" if config.expert_format == "mxfp4" else "bf16"
    start = time.perf_counter()
    params = bits.as_bits(jax.block_until_ready(gptoss_jax.init_params(config, seed=0, dtype=jnp.bfloat16)))
    common.log(f"{fmt}: weights built on {jax.devices()[0].platform} in {time.perf_counter() - start:.1f} s")
    rows = []
    sampling = generate.Sampling()
    key = jax.random.key(0)
    for batch in args.batches:
        if time.perf_counter() > deadline:
            skipped.append(f"{fmt} decode batch {batch}")
            continue
        cache = bits.as_bits(generate.empty_cache(config, batch, args.context))
        tokens = jnp.zeros((batch,), jnp.int32)
        position = args.context // 2
        positions = jnp.full((batch,), position, jnp.int32)
        state = {"cache": cache}

        def steps():
            for _ in range(args.steps):
                _, state["cache"] = generate.decode_step(config, sampling, params, state["cache"], tokens,
                                                         positions, key)
            return state["cache"]

        seconds = _timed(steps, args.repeats) / args.steps
        nbytes = common.bytes_per_token(config, jnp.bfloat16, context=position, batch=batch)["total"]
        flops = batch * flops_per_token(config, position, logits=True)
        rows.append({"format": fmt, "kind": "decode", "batch": batch, "context": position,
                     "tokens_per_second": batch / seconds, "step_ms": seconds * 1e3,
                     "roofline": _roofline(seconds, nbytes, flops, bandwidth, peak),
                     "bytes_per_step": nbytes, "flops_per_step": flops, "peak_memory": _peak_memory()})
        common.log(f"{fmt} decode batch {batch}: {batch / seconds:.1f} tok/s "
                   f"({rows[-1]['roofline']:.0%} of roofline)")
        del cache, state
    for length in args.prefill:
        if time.perf_counter() > deadline:
            skipped.append(f"{fmt} prefill {length}")
            continue
        tokens = jnp.zeros((1, length), jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        holder = {"cache": bits.as_bits(generate.empty_cache(config, 1, length))}

        def once():
            x, holder["cache"] = generate.extend(config, params, holder["cache"], tokens, positions)
            return x

        # two warm-ups: the cache a call returns (donated in) may be laid out unlike the empty one: a second compile
        seconds = _timed(once, max(1, args.repeats // 2), warmup=2)
        weights = common.bytes_per_token(config, jnp.bfloat16, context=0, batch=length)
        nbytes = weights["non_expert"] + weights["experts"] + weights["kv_cache"]  # no unembedding in extend
        flops = length * flops_per_token(config, length / 2, logits=False)
        rows.append({"format": fmt, "kind": "prefill", "tokens": length, "tokens_per_second": length / seconds,
                     "seconds": seconds, "roofline": _roofline(seconds, nbytes, flops, bandwidth, peak),
                     "bytes_per_step": nbytes, "flops_per_step": flops, "peak_memory": _peak_memory()})
        common.log(f"{fmt} prefill {length}: {length / seconds:.0f} tok/s ({rows[-1]['roofline']:.0%} of roofline)")
        del holder
    del params
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]
    parser.add_argument("--quick", action="store_true", help="batches 1, 8; prefill 4096; fewer repeats")
    parser.add_argument("--config", default="gpt-oss-20b")
    parser.add_argument("--formats", default="bf16,mxfp4")
    parser.add_argument("--batches", type=ints)
    parser.add_argument("--prefill", type=ints)
    parser.add_argument("--context", type=int, default=4096, help="KV cache positions of the decode runs")
    parser.add_argument("--steps", type=int, help="decode steps per timed repeat")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--copy-bytes", type=int, help="bytes of the bandwidth probe (default 1 GiB; CPU 64 MiB)")
    parser.add_argument("--budget-seconds", type=float, help="skip measurements past this (default 420; quick 160)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1, 8] if args.quick else [1, 8, 64])
    args.prefill = args.prefill or ([4096] if args.quick else [4096, 32768])
    args.steps = args.steps or (8 if args.quick else 16)
    args.repeats = args.repeats or (3 if args.quick else 5)
    budget = args.budget_seconds or (160.0 if args.quick else 420.0)

    import jax

    import gptoss_jax

    begin = time.perf_counter()
    deadline = begin + budget
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    copy_bytes = args.copy_bytes or ((64 << 20) if on_cpu else (1 << 30))
    bandwidth = copy_bandwidth(copy_bytes)
    peak = matmul_peak(512 if on_cpu else 8192)
    common.log(f"{device.device_kind}: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.1f} TFLOP/s")
    base = gptoss_jax.load_config(args.config)
    rows, skipped = [], []
    for fmt in [f for f in args.formats.split(",") if f]:
        config = dataclasses.replace(base, expert_format="mxfp4" if fmt == "mxfp4" else "dense")
        rows += bench_format(config, args, bandwidth, peak, deadline, skipped)
    result = {"device": device.device_kind, "platform": device.platform, "config": args.config,
              "copy_bandwidth": bandwidth, "matmul_peak": peak, "results": rows, "skipped": skipped,
              "seconds": time.perf_counter() - begin}
    table = [[r["format"], r["kind"], str(r.get("batch", r.get("tokens"))), f"{r['tokens_per_second']:.1f}",
              f"{r['roofline']:.1%}", common.fmt(r["peak_memory"] and r["peak_memory"] / common.GIB)]
             for r in rows]
    common.print_table(table, [9, 14, 10, 13, 10], header=["format", "kind", "batch/tokens", "tok/s", "of roofline",
                                                          "peak GiB"])
    if skipped:
        print("skipped (over budget): " + ", ".join(skipped))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
