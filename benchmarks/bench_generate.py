"""gptoss-jax against transformers' `GptOssForCausalLM` on the same random weights, side by side.

    python benchmarks/bench_generate.py [--quick] [--json results.json]

One run measures, on `configs/bench.json` (8 layers, 32 experts top-4, vocab 201088) in float32
(`--dtype bfloat16`: both sides' weights and caches in bfloat16):

1. the memory-bandwidth roofline: an XLA float32 matvec of a 384 MB matrix (GB/s; torch's too, for
   reference);
2. batch-1 decode tokens/s of both (32-token prompt; `generate` of N+1 new tokens minus `generate` of
   1 new token, greedy, stop tokens off), and the fraction of the roofline each reaches: bytes a
   token must read (non-expert weights + 4 active experts per layer + unembedding + the KV cache at
   that context) / matvec bandwidth;
3. batch-8 decode tokens/s (all rows together) of both;
4. a 4096-token prefill (batch 1) of both: tokens/s and activation memory = peak RSS during the
   prefill (a thread samples it every 5 ms) minus the RSS just before it, after a warm-up and a
   `malloc_trim` (gptoss-jax: `generate.prefill` into an `init_cache` of 4096 slots, its executables
   compiled ahead for those shapes and its first chunk run once, so no compilation is counted;
   transformers: `model(input_ids, use_cache=True, logits_to_keep=1)` under `torch.no_grad()`, warmed
   up on the first 512 tokens);
5. gptoss-jax alone: a 16384-token prompt then 64 decoded tokens, run as `generate` runs them (its
   power-of-two cache bucket included), compiled ahead and timed apart, with its time and peak RSS.
   One run, not the best of 3: it takes about 5 minutes. transformers is not run there: its eager
   attention materialises [heads, 16384, 16384] float32 scores per layer (16 GiB), more than this
   machine has.

Each side runs in its own child process (so that the RSS is its own); each timing is the best of
`--repeats` (3) runs. transformers runs with `attn_implementation="eager"`, float32, torch threads =
2, its default experts implementation (printed) and OMP_WAIT_POLICY=PASSIVE (on a shared machine
OpenMP's default spin-waiting made its timings stall for seconds at random). The random weights come
from `init_params(config, seed, float32)` -> `params_to_hf`, written once as .npy files (HF layout)
under --weights-dir and read back by both sides (`params_from_hf` for gptoss-jax, a strict
`load_state_dict` for transformers); both sides' greedy tokens and last-token logits are compared.
gptoss-jax runs with `jax_log_compiles` and the table says whether anything compiled during a timed
run. Prints a table and writes every figure as JSON (--json). `--quick` runs small shapes (a check
of the script, about 2 minutes once the weights exist). `--breakdown` also times gptoss-jax's pieces
alone (attention layers, MoE layer, unembedding, whole step; `--skip jax,hf,long --breakdown` for
only that; `--breakdown-config` for another config, e.g. an MXFP4 one: see generate_breakdown.py).
The full run takes 10 to 13 minutes on the 2-core machines, more when they are busy.

The workers live in generate_workers.py; what the benchmarks share (RSS sampling, timing,
bandwidth, bytes per token from the model's declared shapes) in common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import GIB, MIB, fmt, log, ratio
from generate_workers import CONFIG_PATH

SIZES = {
    "full": dict(prompt=32, decode_new=64, batch=8, batch_new=32, prefill=4096, long=16384, long_new=64,
                 repeats=3, long_repeats=1, matvec_shape=(12288, 8192)),
    "quick": dict(prompt=32, decode_new=8, batch=8, batch_new=4, prefill=512, long=1024, long_new=16,
                  repeats=2, long_repeats=1, matvec_shape=(8192, 8192)),
}


def run_worker(name: str, args: argparse.Namespace, workdir: Path, timeout: float) -> dict:
    """Runs worker `name` of `generate_workers` in a child process of this script."""
    argv = ["--worker", name, "--weights-dir", str(args.weights_dir), "--seed", str(args.seed), "--repeats",
            str(args.repeats), "--long-repeats", str(args.long_repeats), "--dtype", args.dtype] + (
        ["--quick"] if args.quick else [])
    if args.breakdown_config:
        argv += ["--breakdown-config", args.breakdown_config]
    env = dict(os.environ)
    if name == "hf":
        # On a shared machine torch's default OpenMP spin-waiting stalls for seconds at random (a 1-token
        # generate took 0.4 to 8 s); passive waiting keeps its timings stable and costs it nothing here.
        env.setdefault("OMP_WAIT_POLICY", args.hf_omp_wait_policy)
    return common.run_worker(__file__, argv, name, timeout, env, result=workdir / f"{name}.json")


def summarize(config: Any, sizes: dict, ours: dict, hf: dict, long: dict, dtype: str = "float32") -> dict:
    """The figures of the table (and of the JSON's "summary") from the workers' results."""
    import jax.numpy as jnp
    import numpy as np

    s: dict[str, Any] = {}
    bw = ours.get("bandwidth", {}).get("gb_per_s")
    s["bandwidth_gb_s"] = bw
    s["torch_bandwidth_gb_s"] = hf.get("bandwidth", {}).get("gb_per_s")
    for name, batch in (("decode_b1", 1), ("decode_b8", sizes["batch"])):
        o, t = ours.get(name, {}).get("tokens_per_s"), hf.get(name, {}).get("tokens_per_s")
        s[name] = {"ours_tok_s": o, "hf_tok_s": t, "ratio": ratio(o, t)}
        if name == "decode_b1":
            # KV bytes at the mean context of the timed steps (prompt .. prompt + n)
            context = sizes["prompt"] + sizes["decode_new"] / 2
            nbytes = common.bytes_per_token(config, jnp.dtype(dtype), context)
            roof = bw * 1e9 / nbytes["total"] if bw else None
            s[name].update(bytes_per_token=nbytes, mean_context=context, roofline_tok_s=roof,
                           ours_roofline_fraction=ratio(o, roof), hf_roofline_fraction=ratio(t, roof))
        a, b = ours.get(name, {}).get("tokens"), hf.get(name, {}).get("tokens")
        if a and b:
            same = [int(np.argmin(np.equal(x, y).tolist() + [False])) for x, y in zip(a, b)]
            s[name]["same_leading_tokens_per_row"] = same
            s[name]["new_tokens_per_row"] = len(a[0])
    op, hp = ours.get("prefill", {}), hf.get("prefill", {})
    s["prefill"] = {"tokens": sizes["prefill"], "ours_tok_s": op.get("tokens_per_s"), "hf_tok_s": hp.get("tokens_per_s"),
                    "ratio": ratio(op.get("tokens_per_s"), hp.get("tokens_per_s")),
                    "ours_activation_bytes": op.get("activation_bytes"), "hf_activation_bytes": hp.get("activation_bytes"),
                    "activation_ratio": ratio(op.get("activation_bytes"), hp.get("activation_bytes")),
                    "ours_baseline_rss": op.get("baseline_rss"), "hf_baseline_rss": hp.get("baseline_rss"),
                    "hf_call": hp.get("call")}
    if long and "error" not in long:
        s["long"] = {k: long[k] for k in ("prompt", "new_tokens", "cache_slots_full_layers", "compile_seconds",
                                          "prefill_seconds", "prefill_tokens_per_s", "decode_seconds",
                                          "decode_tokens_per_s", "total_seconds", "rss_weights")}
        s["long"]["peak_rss"] = max(r["peak_rss"] for r in long["runs"])
        for key in ("activation_bytes", "compile_extra_rss", "ru_maxrss_bytes"):
            s["long"][key] = long[key]
    heads = config.num_heads
    s["long_hf"] = ("not attempted: transformers' eager attention builds float32 scores [1, "
                    f"{heads}, {sizes['long']}, {sizes['long']}] per layer = "
                    f"{heads * sizes['long'] ** 2 * 4 / GIB:.1f} GiB, and softmax a second copy, on a "
                    f"{common.ram_bytes() / GIB:.0f} GiB machine")
    return s


def print_table(s: dict, sizes: dict, ours: dict, hf: dict) -> None:
    """The side-by-side table, then the agreement and compilation lines."""
    def mib(n: float | None) -> float | None:
        return n and n / MIB

    def gib(n: float | None) -> float | None:
        return n and n / GIB

    d1, d8, p = s["decode_b1"], s["decode_b8"], s["prefill"]
    rows = [("matvec bandwidth, float32 (GB/s)", fmt(s["bandwidth_gb_s"], "{:.1f}"),
             fmt(s["torch_bandwidth_gb_s"], "{:.1f}") + " (torch)", "", "roofline"),
            (f"decode b=1 ({sizes['prompt']}-token prompt, {sizes['decode_new']} new) tok/s",
             fmt(d1["ours_tok_s"]), fmt(d1["hf_tok_s"]), fmt(d1["ratio"]), "")]
    if d1.get("roofline_tok_s"):
        rows += [(f"  roofline tok/s ({d1['bytes_per_token']['total'] / 1e9:.3f} GB/token)",
                  fmt(d1["roofline_tok_s"]), "", "", ""),
                 ("  roofline fraction", fmt(d1["ours_roofline_fraction"]), fmt(d1["hf_roofline_fraction"]), "", "")]
    rows += [(f"decode b={sizes['batch']} ({sizes['batch_new']} new) tok/s total", fmt(d8["ours_tok_s"]),
              fmt(d8["hf_tok_s"]), fmt(d8["ratio"]), ""),
             (f"prefill {p['tokens']} tokens, tok/s", fmt(p["ours_tok_s"], "{:.1f}"), fmt(p["hf_tok_s"], "{:.1f}"),
              fmt(p["ratio"]), ">= 1.5"),
             (f"prefill {p['tokens']} activation memory (MiB)", fmt(mib(p["ours_activation_bytes"]), "{:.0f}"),
              fmt(mib(p["hf_activation_bytes"]), "{:.0f}"), fmt(p["activation_ratio"], "{:.3f}"), "<= 0.333"),
             ("  RSS with weights, before prefill (GiB)", fmt(gib(p["ours_baseline_rss"])),
              fmt(gib(p["hf_baseline_rss"])), "", "")]
    if "long" in s:
        lg = s["long"]
        rows += [(f"long: prefill {lg['prompt']} (s / tok/s)",
                  f"{lg['prefill_seconds']:.1f} / {lg['prefill_tokens_per_s']:.0f}", "not run", "", ""),
                 (f"long: then decode {lg['new_tokens']} (s / tok/s)",
                  f"{lg['decode_seconds']:.1f} / {lg['decode_tokens_per_s']:.2f}", "not run", "", ""),
                 ("long: total (s), compile separately (s)",
                  f"{lg['total_seconds']:.1f}, {lg['compile_seconds']:.1f}", "", "", ""),
                 (f"long: peak RSS / over weights (GiB), cache {lg['cache_slots_full_layers']} slots",
                  f"{lg['peak_rss'] / GIB:.2f} / {lg['activation_bytes'] / GIB:.2f}", "", "", "")]
    print()
    common.print_table(rows, (16, 22, 10, 0), header=("", "gptoss-jax", "transformers", "ours/HF", "target"))
    print()
    for name in ("decode_b1", "decode_b8"):
        if "same_leading_tokens_per_row" in s[name]:
            print(f"{name}: greedy tokens identical to transformers' for the first "
                  f"{s[name]['same_leading_tokens_per_row']} of {s[name]['new_tokens_per_row']} per row")
    if "logits_max_abs_diff" in s:
        print(f"prefill last-token logits: max |ours - transformers| = {s['logits_max_abs_diff']:.2e}")
    print(f"transformers: attention {hf.get('attn_implementation')}, experts {hf.get('experts_implementation')}, "
          f"torch threads {hf.get('torch_threads')}, OMP_WAIT_POLICY {hf.get('omp_wait_policy')}, "
          f"prefill call: {s['prefill']['hf_call']}")
    print(f"long context, transformers: {s['long_hf']}")
    for who, res in (("gptoss-jax", ours), ("gptoss-jax long", s.get("_long_raw", {}))):
        counts = res.get("compiles", {})
        timed = {k: v for k, v in counts.items() if k.endswith("_timed")}
        if counts:
            print(f"{who} compilations per phase: {counts}"
                  + ("  (none during timed runs)" if not timed else "  <- RECOMPILED DURING TIMED RUNS"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a < 2 minute check of the script")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "gptoss_bench_weights",
                        help="where the random weights are cached as .npy (HF layout); made if missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per figure (0: 3, or 2 with --quick)")
    parser.add_argument("--long-repeats", type=int, default=0, help="runs of the long-context test (0: 1)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time gptoss-jax's pieces (attention, MoE, unembedding) alone (~3 more minutes)")
    parser.add_argument("--breakdown-config", help="config of --breakdown (default configs/bench.json; e.g. an "
                                                   "MXFP4 one); random weights of its shapes")
    parser.add_argument("--hf-omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY for transformers' process, unless set in the environment")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: jax, hf, long")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights (and KV cache) of both sides: the float32 .npy files cast on loading")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]

    if args.worker:
        from generate_workers import WORKERS

        common.write_result(args.result, WORKERS[args.worker](args, sizes))
        return

    from gptoss_jax.config import load_config

    config = load_config(CONFIG_PATH)
    args.weights_dir = Path(args.weights_dir) / f"{config.name}-seed{args.seed}"
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    log(f"{'quick' if args.quick else 'full'} run, {args.dtype}: {sizes}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        workdir = Path(tmp)
        manifest = args.weights_dir / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("config") != config.to_hf_dict():
            log(f"writing random weights (seed {args.seed}) to {args.weights_dir}")
            if "error" in run_worker("init", args, workdir, 900):
                sys.exit("could not write the weights")
        ours = run_worker("jax", args, workdir, 1200) if "jax" not in skip else {}
        hf = run_worker("hf", args, workdir, 1200) if "hf" not in skip else {}
        long = run_worker("jax_long", args, workdir, 1500) if "long" not in skip else {}
        breakdown = run_worker("breakdown", args, workdir, 1200) if args.breakdown else {}
        summary = summarize(config, sizes, ours, hf, long, args.dtype)
        a, b = workdir / "jax.logits.npy", workdir / "hf.logits.npy"
        if a.is_file() and b.is_file():
            import numpy as np

            summary["logits_max_abs_diff"] = float(np.max(np.abs(np.load(a) - np.load(b))))
    summary["_long_raw"] = long
    total = time.perf_counter() - start
    if ours or hf or long:
        print_table(summary, sizes, ours, hf)
    for case, times in breakdown.items():
        if isinstance(times, dict):
            print(f"breakdown, {case}:")
            for piece, seconds in times.items():
                print(f"    {piece:70s} " + (f"{seconds * 1e3:10.1f} ms" if isinstance(seconds, float) else str(seconds)))
    print(f"total wall time {total:.0f} s; load average now {os.getloadavg()}")
    if args.json:
        summary.pop("_long_raw")
        report = {"summary": summary, "sizes": sizes, "config": config.to_hf_dict(), "gptoss_jax": ours,
                  "transformers": hf, "long": long, "breakdown": breakdown, "wall_seconds": total, "cpus": os.cpu_count(),
                  "ram_bytes": common.ram_bytes(), "quick": args.quick}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
