"""gptoss-jax's continuous-batching engine against transformers' continuous batching, side by side.

    python benchmarks/bench_engine.py [--requests 16 --prompt 32 --new 32 --gap 0.25] [--json out.json]

On `configs/bench.json` (8 layers, 32 experts top-4, vocab 201088) in float32, on the random weights
bench_generate.py writes (`init_params(config, seed)` -> HF layout .npy under --weights-dir, made
here if missing), `--requests` requests of `--prompt` random tokens each ask for `--new` tokens
(stop tokens off, greedy), arriving one every `--gap` seconds. Each side runs in its own process:

- gptoss-jax: `Engine(slots, max_context, prefill_chunk=prompt, steps_per_dispatch, prefill_rows)`
  after `warmup`, its background loop (`start`), one thread per request reading `Handle.stream()`;
  then the same requests one at a time with `generate` (compiled beforehand);
- transformers: `model.init_continuous_batching(GenerationConfig(max_new_tokens, greedy))`, its
  `warmup`, `start`, `add_request(..., record_timestamps=True)` at the same times, `get_result`
  (eager attention as loaded by `generate_workers.hf_model`, float32, torch threads = 2,
  OMP_WAIT_POLICY=PASSIVE).

Figures: aggregate tok/s (all generated tokens / first arrival to last finish), time to first token
p50 / p99 (arrival to the first token handed back), time per output token (mean over requests of
(finish - first token) / (tokens - 1)); the bars: engine >= 1.5x transformers' aggregate tok/s and
>= 4x our own one-request-at-a-time tok/s. Whether the engine's tokens equal `generate`'s is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common
from common import fmt, log, ratio
from generate_workers import CONFIG_PATH


def run_worker(name: str, args: argparse.Namespace, workdir: Path, timeout: float) -> dict:
    argv = ["--worker", name, "--weights-dir", str(args.weights_dir), "--requests", str(args.requests), "--prompt",
            str(args.prompt), "--new", str(args.new), "--gap", str(args.gap), "--slots", str(args.slots),
            "--steps-per-dispatch", str(args.steps_per_dispatch), "--max-context", str(args.max_context),
            "--prefill-rows", str(args.prefill_rows)]
    env = dict(os.environ)
    if name == "hf":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return common.run_worker(__file__, argv, name, timeout, env, result=workdir / f"{name}.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--new", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between arrivals")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--steps-per-dispatch", type=int, default=8)
    parser.add_argument("--max-context", type=int, default=128)
    parser.add_argument("--prefill-rows", type=int, default=4)
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "gptoss_bench_weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated sides to skip: jax, hf")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from engine_workers import WORKERS

        common.write_result(args.result, WORKERS[args.worker](args))
        return

    from gptoss_jax.config import load_config

    config = load_config(CONFIG_PATH)
    args.weights_dir = Path(args.weights_dir) / f"{config.name}-seed{args.seed}"
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    log(f"{args.requests} requests x ({args.prompt} prompt + {args.new} new tokens), one every {args.gap} s; "
        f"load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        workdir = Path(tmp)
        manifest = args.weights_dir / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("config") != config.to_hf_dict():
            log(f"writing random weights (seed {args.seed}) to {args.weights_dir}")
            init = [sys.executable, str(Path(__file__).parent / "bench_generate.py"), "--weights-dir",
                    str(args.weights_dir.parent), "--seed", str(args.seed), "--skip", "jax,hf,long"]
            if os.spawnv(os.P_WAIT, sys.executable, init):
                sys.exit("could not write the weights")
        ours = run_worker("jax", args, workdir, 1800) if "jax" not in skip else {}
        hf = run_worker("hf", args, workdir, 1800) if "hf" not in skip else {}
    engine, cb = ours.get("engine", {}), hf.get("continuous_batching", {})
    sequential = ours.get("generate_sequential", {}).get("tok_s")
    rows = [("aggregate tok/s", "tok_s", "{:.1f}"), ("TTFT p50 (s)", "ttft_p50_s", "{:.2f}"),
            ("TTFT p99 (s)", "ttft_p99_s", "{:.2f}"), ("time per output token (ms)", "tpot_s", "{:.1f}")]
    print(f"\n{'':32s}{'gptoss-jax engine':>20s}{'transformers CB':>20s}{'ratio':>10s}")
    for label, key, spec in rows:
        scale = 1e3 if key == "tpot_s" else 1
        a, b = engine.get(key), cb.get(key)
        print(f"{label:32s}{fmt(a and a * scale, spec):>20s}{fmt(b and b * scale, spec):>20s}{fmt(ratio(a, b)):>10s}")
    print(f"{'one at a time (generate) tok/s':32s}{fmt(sequential, '{:.1f}'):>20s}")
    print(f"engine / transformers CB: {fmt(ratio(engine.get('tok_s'), cb.get('tok_s')))}x (bar 1.5x); "
          f"engine / one at a time: {fmt(ratio(engine.get('tok_s'), sequential))}x (bar 4x); engine tokens == "
          f"generate's: {ours.get('generate_same_tokens')}; compiled while timed: {ours.get('compiled_when_timed')}")
    print(f"total wall time {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"gptoss_jax": ours, "transformers": hf, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=1, default=float))


if __name__ == "__main__":
    main()
