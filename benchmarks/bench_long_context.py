"""Long context, side by side: prefill tok/s, decode tok/s and peak RSS of gptoss-jax and transformers
against the context length, the 128k run on the small 64/8-head config, and a greedy-parity check.

    python benchmarks/bench_long_context.py [--quick] [--skip-128k] [--json results.json]

Float32, batch 1, random weights of each config (`init_params` -> `params_to_hf`, written once as
.npy under --weights-dir, read back by both sides: generate_workers' helpers). Every figure comes
from its own child process (so that its peak RSS is its own); transformers' processes run with 2
torch threads and OMP_WAIT_POLICY=PASSIVE, `attn_implementation="eager"`.

1. configs/bench.json (8 layers, 16 query / 4 KV heads, 32 experts top-4, vocab 201088) at contexts
   1024, 4096, 16384, 32768 (a random prompt of that many tokens):
   - gptoss-jax through the public `gptoss_jax.generate(config, params, [prompt], max_new_tokens,
     stop_tokens=[])`, everything compiled first by a warm-up that runs generate's own pieces
     (`_start`, `_decode_loop`, through jit) with the same shapes on the prompt's first chunk
     (`jax_log_compiles` counts any compilation during the timed calls: the table says so);
     prefill = best `generate(max_new_tokens=1)` (3 runs up to 4096; above, the prefill part of
     the one `generate(N + 1)` run: until its first token is ready); decode = the decode loop inside
     `generate(max_new_tokens=N + 1)` (N = 32 steps), timed apart by wrapping `generate`'s
     `_decode_loop` (blocks on the first token, then on the loop); where `generate(1)` ran, also
     (best generate(N + 1) - best generate(1)) / N;
   - transformers' GptOssForCausalLM: prefill = `model(input_ids, use_cache=True, logits_to_keep=1)`
     under `torch.no_grad()` (warmed up on 512 tokens), then N greedy steps with its cache; only
     where its eager attention fits: it holds ~3 float32 [heads, T, T + 1] score tensors at once
     per layer (16 x 16384^2 x 4 B = 16 GiB each at 16k), so a length whose estimate (weights + 3
     score tensors + 2 masks + 1 GiB) exceeds 80% of this machine's memory is "not run", with the
     figure;
   - peak RSS = the process's RSS sampled every 5 ms during its timed calls (weights included);
   - ratios ours / transformers per length; the bars: 4096-token prefill >= 1.5x transformers'
     tok/s, and our decode at 32768 / our decode at 1024 >= 0.7.
2. configs/long-small.json (64 query / 8 KV heads, head_dim 16, 128-token window, hidden 64, 2 layers,
   4 experts top-2, vocab 2048) filled to its whole 131072-token context: a 131056-token prompt, then
   16 new tokens, in one `generate` call (split as above); prefill s and tok/s, decode tok/s, peak
   RSS against weights + cache (`abstract_cache` at generate's bucket) + 2 GiB. gptoss-jax only
   (transformers' scores there: 64 x 131072^2 x 4 B = 4 TiB per layer). `--skip-128k` skips it; it
   takes long (the full-attention layer's prefill is quadratic: 9 s at 4k and ~110 s at 16k on a busy
   2-core machine, so about 1 to 2 hours at 128k); `--long-context` sets another length.
3. Greedy parity on long-small: a 3000-token random prompt, 32 greedy new tokens, gptoss-jax's
   `generate` against transformers' `generate(do_sample=False)`; equal token for token, or the
   index of the first mismatch.

Prints one table and the bars; `--json FILE` writes every figure. `--quick` runs small sizes
(contexts 256 and 1024, the long run at 4096, parity at 700 tokens; every code path, ~3 minutes). The
full run without the 128k part takes about 25-35 minutes here (the 4k repeats and the 16k and 32k
prefills dominate); `--contexts` and `--new` pick other lengths and decode steps.
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
from common import GIB, fmt, log, ratio
from long_context_workers import first_mismatch

BENCH = common.REPO / "configs" / "bench.json"
SMALL = common.REPO / "configs" / "long-small.json"

SIZES = {
    "full": dict(contexts=(1024, 4096, 16384, 32768), new=32, repeats_short=3, up_to=4096, long=131072,
                 long_new=16, parity=3000, parity_new=32, bar_prefill=4096, bar_decode=(32768, 1024)),
    "quick": dict(contexts=(256, 1024), new=4, repeats_short=1, up_to=4096, long=4096, long_new=8,
                  parity=700, parity_new=8, bar_prefill=1024, bar_decode=(1024, 256)),
}
HF_SCORE_COPIES = 3  # live float32 [heads, T, T + 1] tensors of transformers' eager attention at once
MEMORY_SHARE = 0.8


def weights_dir(args: argparse.Namespace, config_path: Path, workdir: Path) -> Path:
    """The config's random weights (seed --seed) under --weights-dir, written if missing or stale."""
    from gptoss_jax.config import load_config

    config = load_config(config_path)
    out = Path(args.weights_dir) / f"{config.name}-seed{args.seed}"
    manifest = out / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("config") != config.to_hf_dict():
        log(f"writing random weights of {config.name} (seed {args.seed}) to {out}")
        if "error" in worker("init", args, config_path, out, workdir, 0, 0):
            sys.exit(f"could not write the weights of {config.name}")
    return out


def worker(name: str, args: argparse.Namespace, config_path: Path, weights: Path, workdir: Path, context: int,
           new: int, repeats: int = 1, prefill_repeats: int = 0, timeout: float = 4 * 3600) -> dict:
    """Runs worker `name` of long_context_workers in a child process of this script."""
    argv = ["--worker", name, "--config", str(config_path), "--weights-dir", str(weights), "--seed", str(args.seed),
            "--context", str(context), "--new", str(new), "--repeats", str(repeats),
            "--prefill-repeats", str(prefill_repeats)]
    env = dict(os.environ)
    if name.startswith("hf"):
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's spin-waiting stalls at random on a shared machine
    tag = f"{name}_{context}" if context else name
    return common.run_worker(__file__, argv, tag, timeout, env, result=workdir / f"{tag}.json")


def hf_estimate(config: Any, context: int, weight_bytes: int) -> tuple[bool, str]:
    """Whether transformers' eager attention fits at `context`, and the figure."""
    scores = config.num_heads * context * (context + 1) * 4
    need = weight_bytes + HF_SCORE_COPIES * scores + 2 * context * context * 4 + GIB
    limit = MEMORY_SHARE * common.ram_bytes()
    figure = (f"eager float32 scores [{config.num_heads}, {context}, {context + 1}] = {scores / GIB:.1f} GiB per "
              f"layer, ~{HF_SCORE_COPIES} at once + weights {weight_bytes / GIB:.1f} GiB: ~{need / GIB:.1f} GiB")
    if need <= limit:
        return True, f"fits: {figure}"
    return False, f"not run: {figure} > {MEMORY_SHARE:.0%} of this machine's {common.ram_bytes() / GIB:.0f} GiB"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.npy"))


def timed_compiles(result: dict) -> dict:
    return {k: v for k, v in result.get("compiles", {}).items() if k == "timed"}


def summarize(sizes: dict, cases: list[dict], long: dict, parity: dict) -> dict:
    """The figures of the table (and of the JSON's "summary")."""
    s: dict[str, Any] = {"contexts": []}
    by_context = {}
    for case in cases:
        o, h = case["ours"], case["hf"]
        row = {"context": case["context"], "hf_estimate": case["hf_estimate"]}
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss"):
            row[f"ours_{key}"], row[f"hf_{key}"] = o.get(key), h.get(key)
            row[f"ratio_{key}"] = ratio(o.get(key), h.get(key))
        row["ours_decode_tokens_per_s_by_difference"] = o.get("decode_tokens_per_s_by_difference")
        row["ours_prefill_via"] = o.get("prefill_via")
        row["ours_error"], row["hf_error"] = o.get("error"), h.get("error")
        row["hf_not_run"] = h.get("not_run")
        if o.get("tokens") and h.get("tokens"):
            row["greedy_first_mismatch"] = first_mismatch(o["tokens"], h["tokens"])
            row["greedy_new_tokens"] = len(o["tokens"])
        row["ours_compiles_during_timed"] = timed_compiles(o)
        s["contexts"].append(row)
        by_context[case["context"]] = row
    bars: dict[str, Any] = {}
    p = by_context.get(sizes["bar_prefill"], {})
    bars["prefill"] = {"context": sizes["bar_prefill"], "value": p.get("ratio_prefill_tokens_per_s"), "bar": 1.5,
                       "what": f"prefill {sizes['bar_prefill']} tokens through generate, ours / transformers tok/s"}
    longer, shorter = (by_context.get(c, {}) for c in sizes["bar_decode"])
    bars["decode"] = {"contexts": sizes["bar_decode"], "bar": 0.7,
                      "value": ratio(longer.get("ours_decode_tokens_per_s"), shorter.get("ours_decode_tokens_per_s")),
                      "what": f"our batch-1 decode tok/s at {sizes['bar_decode'][0]} / at {sizes['bar_decode'][1]}"}
    for bar in bars.values():
        bar["pass"] = None if bar["value"] is None else bar["value"] >= bar["bar"]
    s["bars"] = bars
    if long and "error" not in long:
        s["long"] = {k: long[k] for k in ("config", "prompt", "new_tokens", "context", "prefill_s", "decode_s",
                                          "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss", "rss_before",
                                          "weight_bytes", "cache_bytes", "rss_bound", "rss_within_bound",
                                          "warmup_seconds")}
        s["long"]["compiles_during_timed"] = timed_compiles(long)
    elif long:
        s["long"] = {"error": long["error"]}
    if parity:
        a, b = parity["ours"].get("tokens"), parity["hf"].get("tokens")
        s["parity"] = {"prompt": parity["prompt"], "new_tokens": parity["new"], "ours": a, "hf": b,
                       "errors": [x["error"] for x in (parity["ours"], parity["hf"]) if "error" in x]}
        if a is not None and b is not None:
            s["parity"]["first_mismatch"] = first_mismatch(a, b)
            s["parity"]["equal"] = s["parity"]["first_mismatch"] is None
    return s


def print_table(s: dict, sizes: dict, long_hf: str) -> None:
    def gib(n: float | None) -> float | None:
        return None if n is None else n / GIB

    rows = []
    for r in s["contexts"]:
        hf_missing = "not run" if r["hf_not_run"] else ("error" if r["hf_error"] else None)
        ours_missing = "error" if r["ours_error"] else None
        rows.append((f"bench {r['context']}",
                     ours_missing or fmt(r["ours_prefill_tokens_per_s"], "{:.0f}"),
                     hf_missing or fmt(r["hf_prefill_tokens_per_s"], "{:.0f}"), fmt(r["ratio_prefill_tokens_per_s"]),
                     ours_missing or fmt(r["ours_decode_tokens_per_s"]),
                     hf_missing or fmt(r["hf_decode_tokens_per_s"]), fmt(r["ratio_decode_tokens_per_s"]),
                     ours_missing or fmt(gib(r["ours_peak_rss"])), hf_missing or fmt(gib(r["hf_peak_rss"])),
                     fmt(r["ratio_peak_rss"])))
    lg = s.get("long", {})
    if "prefill_s" in lg:
        rows.append((f"{lg['config']} {lg['context']}", fmt(lg["prefill_tokens_per_s"], "{:.0f}"), "not run", "-",
                     fmt(lg["decode_tokens_per_s"]), "not run", "-", fmt(gib(lg["peak_rss"])), "not run", "-"))
    print()
    common.print_table(rows, (10, 9, 6, 10, 9, 6, 10, 9, 6),
                       header=("context", "prefill", "HF", "ratio", "decode", "HF", "ratio", "peak RSS", "HF", "ratio"))
    print("(prefill and decode in tok/s, batch 1, float32; peak RSS in GiB, weights included; ratio: ours / HF)")
    print()
    for r in s["contexts"]:
        notes = []
        if r["ours_decode_tokens_per_s_by_difference"]:
            notes.append(f"decode by (generate(N+1) - generate(1)) / N: "
                         f"{r['ours_decode_tokens_per_s_by_difference']:.2f} tok/s")
        if r["ours_prefill_via"]:
            notes.append(f"prefill via {r['ours_prefill_via']}")
        if "greedy_first_mismatch" in r:
            m = r["greedy_first_mismatch"]
            notes.append(f"greedy tokens {'equal' if m is None else f'differ from index {m}'} "
                         f"({r['greedy_new_tokens']} new)")
        if r["ours_compiles_during_timed"]:
            notes.append(f"RECOMPILED DURING TIMED CALLS {r['ours_compiles_during_timed']}")
        if r["hf_not_run"]:
            notes.append(f"transformers {r['hf_not_run']}")
        for who in ("ours", "hf"):
            if r[f"{who}_error"]:
                notes.append(f"{who}: {r[who + '_error'].splitlines()[0]}")
        print(f"bench {r['context']}: " + "; ".join(notes))
    if "prefill_s" in lg:
        print(f"{lg['config']}: prompt {lg['prompt']} + {lg['new_tokens']} new = {lg['context']} tokens: prefill "
              f"{lg['prefill_s']:.1f} s ({lg['prefill_tokens_per_s']:.0f} tok/s), decode {lg['decode_tokens_per_s']:.2f} "
              f"tok/s; peak RSS {lg['peak_rss'] / GIB:.2f} GiB <= weights {lg['weight_bytes'] / GIB:.3f} + cache "
              f"{lg['cache_bytes'] / GIB:.3f} + 2 GiB = {lg['rss_bound'] / GIB:.2f} GiB: "
              f"{'PASS' if lg['rss_within_bound'] else 'FAIL'}"
              + (f"; RECOMPILED DURING THE TIMED CALL {lg['compiles_during_timed']}" if lg["compiles_during_timed"] else ""))
        print(f"{lg['config']}, transformers: {long_hf}")
    elif "error" in lg:
        print(f"long run: ERROR {lg['error'].splitlines()[0]}")
    if "parity" in s:
        p = s["parity"]
        verdict = ("ERROR " + "; ".join(e.splitlines()[0] for e in p["errors"]) if p["errors"] else
                   "PASS: equal token for token" if p["equal"] else f"FAIL: first mismatch at index {p['first_mismatch']}")
        print(f"greedy parity, long-small, {p['prompt']}-token prompt, {p['new_tokens']} new: {verdict}")
    print()
    for bar in s["bars"].values():
        verdict = "-" if bar["pass"] is None else "PASS" if bar["pass"] else "FAIL"
        print(f"bar: {bar['what']}: {fmt(bar['value'])} (>= {bar['bar']}) {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="small sizes: a ~3 minute check of the script")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "gptoss_bench_weights",
                        help="where the random weights are cached as .npy (HF layout; bench_generate's too)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contexts", help="comma-separated bench-config contexts (default 1024,4096,16384,32768)")
    parser.add_argument("--long-context", type=int, help="tokens of the long-small run (default 131072)")
    parser.add_argument("--skip-128k", action="store_true", help="skip the long-small long run")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: jax, hf, parity")
    for hidden in ("--worker", "--result", "--config"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--new", type=int, default=0, help="decode steps N per context (default 32; 4 with --quick)")
    for hidden in ("--context", "--repeats", "--prefill-repeats"):
        parser.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        from long_context_workers import WORKERS

        common.write_result(args.result, WORKERS[args.worker](args))
        return

    from gptoss_jax.config import load_config

    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.contexts:
        sizes["contexts"] = tuple(int(c) for c in args.contexts.split(","))
    if args.new:
        sizes["new"] = args.new
    if args.long_context:
        sizes["long"] = args.long_context
    skip = set(filter(None, args.skip.split(",")))
    bench, small = load_config(BENCH), load_config(SMALL)
    start = time.perf_counter()
    log(f"{'quick' if args.quick else 'full'} run: {sizes}; load average {os.getloadavg()}")
    cases, long, parity = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_long_context_") as tmp:
        workdir = Path(tmp)
        bench_weights, small_weights = weights_dir(args, BENCH, workdir), weights_dir(args, SMALL, workdir)
        n = sizes["new"]
        for context in sizes["contexts"] if not {"jax", "hf"} <= skip else ():
            short = context <= sizes["up_to"]
            repeats, prefill_repeats = (sizes["repeats_short"], sizes["repeats_short"]) if short else (1, 0)
            fits, figure = hf_estimate(bench, context, dir_bytes(bench_weights))
            ours = {} if "jax" in skip else worker("jax_context", args, BENCH, bench_weights, workdir, context, n,
                                                    repeats, prefill_repeats)
            if "hf" in skip:
                hf = {}
            elif not fits:
                log(f"transformers at {context}: {figure}")
                hf = {"not_run": figure}
            else:
                hf = worker("hf_context", args, BENCH, bench_weights, workdir, context, n, repeats)
            cases.append({"context": context, "ours": ours, "hf": hf, "hf_estimate": figure})
        if not args.skip_128k and "jax" not in skip:
            long = worker("jax_long", args, SMALL, small_weights, workdir, sizes["long"], sizes["long_new"],
                          timeout=12 * 3600)
        if "parity" not in skip:
            parity = {"prompt": sizes["parity"], "new": sizes["parity_new"]}
            for side in ("jax", "hf"):
                parity["ours" if side == "jax" else "hf"] = worker(f"{side}_parity", args, SMALL, small_weights,
                                                                   workdir, sizes["parity"], sizes["parity_new"])
    fits, long_hf = hf_estimate(small, sizes["long"], dir_bytes(small_weights))
    long_hf = long_hf if not fits else f"not run (gptoss-jax only at this size; {long_hf})"
    summary = summarize(sizes, cases, long, parity)
    summary["long_hf"] = long_hf
    total = time.perf_counter() - start
    print_table(summary, sizes, long_hf)
    print(f"total wall time {total:.0f} s; load average now {os.getloadavg()}")
    if args.json:
        report = {"summary": summary, "sizes": sizes, "quick": args.quick, "configs": {
                      "bench": bench.to_hf_dict(), "long-small": small.to_hf_dict()},
                  "cases": cases, "long": long, "parity": parity, "wall_seconds": total, "cpus": os.cpu_count(),
                  "ram_bytes": common.ram_bytes()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
