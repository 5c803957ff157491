"""gpt-oss-20b with MXFP4-native experts on this CPU machine: convert, load, decode; memory and speed.

    python benchmarks/bench_mxfp4_20b.py [--src DIR] [--work DIR] [--new-tokens 32] [--json out.json]

Steps, each in its own child process (so that its peak RSS, `ru_maxrss`, is its own):

1. `--src` (a gpt-oss-20b checkpoint in the released layout), or a synthetic one with the release's
   names, shapes and dtypes made by `make_synthetic_20b.py` under --work (13.8 GB, a few minutes);
2. the memory-bandwidth roofline: an XLA float32 matvec of a 384 MB matrix (GB/s);
3. `convert_checkpoint(..., keep_mxfp4=True)` to an Orbax checkpoint: seconds and peak RSS;
4. `load_model` of it (experts stay MXFP4: uint8 blocks + scales, the rest bfloat16), a 64-token
   prompt, then `--new-tokens` greedy tokens through `stream_generate` (one jitted decode step per
   token): load seconds, prefill seconds, decode tokens/s (median step after the first, which
   compiles), peak RSS of the whole process;
5. the fraction of the roofline: bytes one batch-1 decode token must read (4 experts per layer as
   packed MXFP4, attention / router / unembedding in bfloat16, the KV cache) / matvec bandwidth,
   against the measured time per token.

transformers is not run: its gpt-oss loader dequantizes the experts to bfloat16 (~41.8 GB of
weights), more than this machine's 24 GiB. Prints a table; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import GIB, REPO


def log(msg: str) -> None:
    common.log(msg, sys.stderr)


# ---------------------------------------------------------------------------------------------
# children (each writes its figures as JSON)

def child_bandwidth(_: argparse.Namespace) -> dict[str, Any]:
    return common.matvec_bandwidth((12288, 8192))


def child_convert(args: argparse.Namespace) -> dict[str, Any]:
    from gptoss_jax.checkpoint import convert_checkpoint

    start = time.perf_counter()
    convert_checkpoint(args.src, args.dst, keep_mxfp4=True, force=True, progress=False)
    return {"seconds": time.perf_counter() - start, "peak_rss": common.max_rss()}


def child_decode(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    import gptoss_jax

    start = time.perf_counter()
    config, params = gptoss_jax.load_model(args.dst)
    jax.block_until_ready(params)
    load_seconds = time.perf_counter() - start
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    prompt = np.random.default_rng(0).integers(0, min(config.vocab_size, 200000), args.prompt_tokens).tolist()
    steps, tokens = [], []
    start = time.perf_counter()
    for step in gptoss_jax.stream_generate(config, params, [prompt], args.new_tokens, stop_tokens=[]):
        now = time.perf_counter()
        steps.append(now - start)
        tokens.append(step[0])
        start = now
    decode = steps[2:]  # steps[0]: prefill (+ compile); steps[1]: the decode step's compile
    return {"expert_format": config.expert_format, "load_seconds": load_seconds, "weight_bytes": weight_bytes,
            "prefill_seconds": steps[0], "first_decode_seconds": steps[1],
            "median_step_seconds": statistics.median(decode), "best_step_seconds": min(decode),
            "tokens": tokens, "peak_rss": common.max_rss()}


CHILDREN = {"bandwidth": child_bandwidth, "convert": child_convert, "decode": child_decode}


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    log(f"{name} ...")
    result = common.run_worker(__file__, ["--child", name, "--src", str(args.src), "--dst", str(args.dst),
                                          "--new-tokens", str(args.new_tokens), "--prompt-tokens",
                                          str(args.prompt_tokens)], name)
    if "error" in result:
        sys.exit(f"{name} failed: {result['error']}")
    log(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'tokens'})}")
    return result


# ---------------------------------------------------------------------------------------------
# main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="gpt-oss-20b in the released layout (default: synthetic)")
    parser.add_argument("--work", type=Path, default=Path("bench-mxfp4-20b"), help="where the files go")
    parser.add_argument("--dst", type=Path, help="converted checkpoint (default: WORK/orbax-mxfp4)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--skip-convert", action="store_true", help="reuse an existing --dst")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        common.write_result(args.result, CHILDREN[args.child](args))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    if args.src is None:
        args.src = args.work / "synthetic-20b"
        if not (args.src / "model.safetensors.index.json").exists():
            log(f"writing a synthetic gpt-oss-20b to {args.src}")
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_synthetic_20b.py"), str(args.src)],
                           check=True)
    args.dst = args.dst or args.work / "orbax-mxfp4"
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}}
    results["bandwidth"] = run_child("bandwidth", args)
    if not args.skip_convert:
        results["convert"] = run_child("convert", args)
    results["decode"] = run_child("decode", args)

    import jax.numpy as jnp

    from gptoss_jax import load_config

    config = load_config(args.dst)
    context = args.prompt_tokens + args.new_tokens // 2
    need = common.bytes_per_token(config, jnp.bfloat16, context)  # as loaded: experts packed, the rest bfloat16
    bandwidth = results["bandwidth"]["gb_per_s"] * 1e9
    roofline_seconds = need["total"] / bandwidth
    step = results["decode"]["median_step_seconds"]
    results["roofline"] = {"bytes_per_token": need, "roofline_tokens_per_s": 1 / roofline_seconds,
                           "tokens_per_s": 1 / step, "fraction": roofline_seconds / step}
    rows = [("matvec bandwidth (float32)", f"{bandwidth / 1e9:.1f} GB/s"),
            ("weights in memory", f"{results['decode']['weight_bytes'] / 1e9:.2f} GB"
                                  f" (experts {config.expert_format})")]
    if "convert" in results:
        rows += [("convert --keep-mxfp4", f"{results['convert']['seconds']:.0f} s, "
                                          f"peak RSS {results['convert']['peak_rss'] / GIB:.2f} GiB")]
    d = results["decode"]
    rows += [("load", f"{d['load_seconds']:.1f} s"),
             (f"prefill {args.prompt_tokens} tokens (incl. compile)", f"{d['prefill_seconds']:.1f} s"),
             (f"decode, median of {args.new_tokens - 2} steps", f"{1 / step:.2f} tokens/s ({step * 1e3:.0f} ms)"),
             ("bytes read per token", f"{need['total'] / 1e9:.2f} GB (experts {need['experts'] / 1e9:.2f}, "
                                      f"unembed {need['unembed'] / 1e9:.2f}, rest {need['non_expert'] / 1e9:.2f})"),
             ("roofline", f"{1 / roofline_seconds:.1f} tokens/s; reached {results['roofline']['fraction']:.1%}"),
             ("peak RSS, load + decode", f"{d['peak_rss'] / GIB:.2f} GiB (bar: 16 GiB)"),
             ("transformers", "cannot load: dequantizes experts to bfloat16, ~41.8 GB > this machine's RAM")]
    common.print_table(rows, (0,), first=max(len(r[0]) for r in rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
