"""Sharded dropless MoE against the same forward with every expert computed densely, on one mesh.

    python benchmarks/bench_moe_sharding.py [--mesh expert=4,tensor=2] [--tokens 8 256] [--dtype float32]

Runs the model's forward on `--mesh` (8 simulated CPU devices unless real ones exist) twice per
token count, with the experts' exchange strategy forced through `gptoss_jax.sharding.moe_strategy`:
- "auto": what the model uses (on CPU: all-gather, then only the routed (token, expert) rows),
- "dense": the same exchange, but each shard multiplies every local expert with every token and
  weights the results by the gates (0 where not routed): the baseline,
and also "ragged_all_to_all" (on CPU an emulation with worst-case slots, so an upper bound).
Prints the median wall time of each and the ratio dense / auto (> 1: the sparse path is faster),
and checks that all three give the same logits (float32: within 1e-4 relative; bfloat16, where
summation order moves roundings: the same argmax on >= 95% of positions).

The config is configs/bench.json (hidden 1024, 32 experts, top-4, intermediate 1024) with a
smaller vocabulary (8192) and 4 layers, so that the unembedding does not drown the experts. The
batch is 8 sequences (8 tokens: one decode step; 256 tokens: 32 each), split over the expert axis.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax import sharding  # noqa: E402

import common  # noqa: E402


def timed(fn, *args, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of `repeats` calls after a warm-up (compilation) one, and the output."""
    times, out = common.run_times(fn, *args, repeats=repeats)
    return statistics.median(times), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="expert=4,tensor=2")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    base = gptoss_jax.load_config("bench")
    config = dataclasses.replace(base, name="bench-moe", num_layers=args.layers, vocab_size=args.vocab,
                                 layer_types=base.layer_types[:2] * (args.layers // 2))
    mesh = sharding.make_mesh(args.mesh)
    dtype = jnp.dtype(args.dtype)
    params = gptoss_jax.init_params(config, 0, dtype, mesh=mesh)
    print(f"{config.name}: hidden {config.hidden}, {config.num_experts} experts (top-{config.experts_per_token}), "
          f"intermediate {config.intermediate}, {config.num_layers} layers, vocab {config.vocab_size}, {args.dtype}; "
          f"mesh {sharding.describe(mesh)} on {jax.device_count()} {jax.devices()[0].platform} devices")
    print(f"{'tokens':>6} {'auto ms':>9} {'dense ms':>9} {'a2a ms':>9} {'dense/auto':>11}")
    ratios = {}
    for tokens_total in args.tokens:
        seq = max(1, tokens_total // args.batch)
        tokens = np.random.default_rng(tokens_total).integers(0, config.vocab_size, (args.batch, seq)).astype(np.int32)
        results = {}
        for strategy in ("auto", "dense", "ragged_all_to_all"):
            with jax.set_mesh(mesh), sharding.moe_strategy(strategy):
                fn = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))
                results[strategy] = timed(fn, params, tokens, repeats=args.repeats)
        reference = results["dense"][1]
        for strategy in ("auto", "ragged_all_to_all"):
            logits = results[strategy][1]
            if args.dtype == "float32":
                error = np.abs(logits - reference).max() / np.abs(reference).max()
                assert error < 1e-4, (strategy, error)
            else:  # bfloat16 rounds differently after different summation orders: compare choices
                agreement = np.mean(logits.argmax(-1) == reference.argmax(-1))
                assert agreement >= 0.95, (strategy, agreement)
        ratios[tokens_total] = results["dense"][0] / results["auto"][0]
        print(f"{args.batch * seq:>6} {1e3 * results['auto'][0]:>9.1f} {1e3 * results['dense'][0]:>9.1f} "
              f"{1e3 * results['ragged_all_to_all'][0]:>9.1f} {ratios[tokens_total]:>10.2f}x")
    slower = [n for n, r in ratios.items() if r < 1]
    print("sparse path at least as fast as dense at every size" if not slower
          else f"sparse path SLOWER than dense at {slower} tokens")


if __name__ == "__main__":
    main()
