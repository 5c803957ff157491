"""gpt-oss-20b with MXFP4-native experts on this CPU machine: convert, load, decode; memory and speed;
the same model in llama.cpp side by side.

    python benchmarks/bench_mxfp4_20b.py [--src DIR] [--work DIR] [--new-tokens 32] [--json out.json]
                                         [--skip-ours | --skip-llamacpp] [--gguf-dtype bf16|q8_0]

Steps, each in its own child process (so that its peak RSS, `ru_maxrss`, is its own):

1. `--src` (a gpt-oss-20b checkpoint in the released layout), or a synthetic one with the release's
   names, shapes and dtypes made by `make_synthetic_20b.py` under --work (13.8 GB, a few minutes);
2. the memory-bandwidth roofline: an XLA float32 matvec of a 384 MB matrix (GB/s);
3. `convert_checkpoint(..., keep_mxfp4=True)` to an Orbax checkpoint: seconds and peak RSS;
4. `load_model` of it (experts stay MXFP4: uint8 blocks + scales, the rest bfloat16), a 64-token
   prompt, then `--new-tokens` greedy tokens through `stream_generate` (one jitted decode step per
   token): load seconds, prefill seconds, decode tokens/s (median step after the first, which
   compiles), then the same with `Config.expert_activations` "int8" (x quantized to int8 blocks
   entering the MXFP4 experts, as llama.cpp does: `--int8-activations`); then a `--prefill-tokens`
   (512) prompt twice through `stream_generate` (one new token): the second one's time to its first
   token is the warm prefill; peak RSS of the process;
5. the fraction of the roofline: bytes one batch-1 decode token must read (4 experts per layer as
   packed MXFP4, attention / router / unembedding in bfloat16, the KV cache) / matvec bandwidth,
   against the measured time per token;
6. llama.cpp: `gguf_writer.write_gguf` of the source into WORK/gpt-oss-20b-mxfp4-{dtype}.gguf (once;
   reused when present): experts MXFP4 (the same bytes), the other matrices `--gguf-dtype`;
7. llama.cpp (llama-cpp-python) on it, without mmap (mmap'd weights would count as droppable file
   pages), 2 threads: the 512-token prompt evaluated twice, the KV cache cleared between (`reset`),
   the second timed; then the 64-token prompt and `--new-tokens` greedy tokens, one `eval` each
   (median); peak RSS of the process. Their tokens are not compared: the synthetic weights make the
   model chaotic (llama.cpp's own logits move by 50-120% of the largest between an f16 and an f32 KV
   cache); tests/test_gguf.py shows that llama.cpp runs our model.

Prints a table of ours, then ours and llama.cpp side by side (decode b=1 and warm 512-token prefill
tokens/s, peak RSS); --json writes every figure. llama.cpp comes with the `bench` extra (builds from
source, 5-9 minutes; the AMX flags avoid a SIGILL in GCC 12's build for AMX CPUs, harmless elsewhere):

    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
      -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install -e '.[bench]'

transformers is not run: its gpt-oss loader dequantizes the experts to bfloat16 (~41.8 GB of
weights), more than this machine's 24 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
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

def random_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """`length` random token ids below min(vocab_size, 200000) (ordinary tokens, no specials)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, min(vocab_size, 200000), length).tolist()


def child_bandwidth(_: argparse.Namespace) -> dict[str, Any]:
    return common.matvec_bandwidth((12288, 8192))


def child_convert(args: argparse.Namespace) -> dict[str, Any]:
    from gptoss_jax.checkpoint import convert_checkpoint

    start = time.perf_counter()
    convert_checkpoint(args.src, args.dst, keep_mxfp4=True, force=True, progress=False)
    return {"seconds": time.perf_counter() - start, "peak_rss": common.max_rss()}


def child_decode(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    import gptoss_jax

    start = time.perf_counter()
    config, params = gptoss_jax.load_model(args.dst)
    jax.block_until_ready(params)
    load_seconds = time.perf_counter() - start
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    prompt = random_prompt(config.vocab_size, args.prompt_tokens)

    def decode_steps(config: Any) -> tuple[list[float], list[int]]:
        steps, tokens = [], []
        start = time.perf_counter()
        for step in gptoss_jax.stream_generate(config, params, [prompt], args.new_tokens, stop_tokens=[]):
            now = time.perf_counter()
            steps.append(now - start)
            tokens.append(step[0])
            start = now
        return steps, tokens

    steps, tokens = decode_steps(config)
    decode = steps[2:]  # steps[0]: prefill (+ compile); steps[1]: the decode step's compile
    int8_steps, int8_tokens = decode_steps(dataclasses.replace(config, expert_activations="int8"))
    long_prompt = random_prompt(config.vocab_size, args.prefill_tokens, seed=1)

    def first_token_seconds() -> float:  # the prompt's prefill (one chunk of 512) and its sampled token
        begin = time.perf_counter()
        next(iter(gptoss_jax.stream_generate(config, params, [long_prompt], 1, stop_tokens=[])))
        return time.perf_counter() - begin

    cold = first_token_seconds()  # compiles
    return {"expert_format": config.expert_format, "load_seconds": load_seconds, "weight_bytes": weight_bytes,
            "prefill_seconds": steps[0], "first_decode_seconds": steps[1],
            "median_step_seconds": statistics.median(decode), "best_step_seconds": min(decode),
            "int8_median_step_seconds": statistics.median(int8_steps[2:]), "int8_tokens": int8_tokens,
            "long_prefill_cold_seconds": cold, "long_prefill_seconds": first_token_seconds(),
            "tokens": tokens, "peak_rss": common.max_rss()}


def child_gguf(args: argparse.Namespace) -> dict[str, Any]:
    from gguf_writer import write_gguf

    start = time.perf_counter()
    write_gguf(args.src, args.gguf, args.gguf_dtype)
    return {"seconds": time.perf_counter() - start, "bytes": args.gguf.stat().st_size, "peak_rss": common.max_rss()}


def child_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    n_ctx = max(args.prefill_tokens, args.prompt_tokens + args.new_tokens)
    llm = llama_cpp.Llama(str(args.gguf), use_mmap=False, n_ctx=n_ctx, n_batch=args.prefill_tokens, n_threads=2,
                          n_threads_batch=2, verbose=False)
    load_seconds = time.perf_counter() - start

    def evaluate(tokens: list[int], reset: bool = False) -> float:
        if reset:
            llm.reset()  # n_tokens = 0: the next eval clears the KV cache and starts at position 0
        begin = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - begin

    long_prompt = random_prompt(llm.n_vocab(), args.prefill_tokens, seed=1)
    prefill = [evaluate(long_prompt, reset=True) for _ in range(2)]  # the first warms up
    prompt_seconds = evaluate(random_prompt(llm.n_vocab(), args.prompt_tokens), reset=True)
    steps, tokens = [], []
    for _ in range(args.new_tokens):
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # (llm.scores holds logits only with logits_all)
        tokens.append(int(np.argmax(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)))))
        steps.append(evaluate(tokens[-1:]))
    return {"load_seconds": load_seconds, "long_prefill_cold_seconds": prefill[0], "long_prefill_seconds": prefill[1],
            "prefill_seconds": prompt_seconds, "median_step_seconds": statistics.median(steps),
            "best_step_seconds": min(steps), "tokens": tokens, "peak_rss": common.max_rss()}


CHILDREN = {"bandwidth": child_bandwidth, "convert": child_convert, "decode": child_decode, "gguf": child_gguf,
            "llamacpp": child_llamacpp}


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    log(f"{name} ...")
    passed = ("src", "dst", "gguf", "gguf_dtype", "new_tokens", "prompt_tokens", "prefill_tokens")
    argv = [x for key in passed for x in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]
    result = common.run_worker(__file__, ["--child", name, *argv], name)
    if "error" in result:
        sys.exit(f"{name} failed: {result['error']}")
    log(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'tokens'})}")
    return result


# ---------------------------------------------------------------------------------------------
# main

def report_ours(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Our steps 2-5: runs the children, adds the roofline to `results`, prints our table."""
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
             ("decode, int8 activations (--int8-activations)",
              f"{1 / d['int8_median_step_seconds']:.2f} tokens/s ({d['int8_median_step_seconds'] * 1e3:.0f} ms)"),
             (f"prefill {args.prefill_tokens} tokens (warm)", f"{d['long_prefill_seconds']:.1f} s "
                                                             f"(cold {d['long_prefill_cold_seconds']:.1f} s)"),
             ("bytes read per token", f"{need['total'] / 1e9:.2f} GB (experts {need['experts'] / 1e9:.2f}, "
                                      f"unembed {need['unembed'] / 1e9:.2f}, rest {need['non_expert'] / 1e9:.2f})"),
             ("roofline", f"{1 / roofline_seconds:.1f} tokens/s; reached {results['roofline']['fraction']:.1%}"),
             ("peak RSS, load + decode + prefill", f"{d['peak_rss'] / GIB:.2f} GiB (bar: 16 GiB)"),
             ("transformers", "cannot load: dequantizes experts to bfloat16, ~41.8 GB > this machine's RAM")]
    common.print_table(rows, (0,), first=max(len(r[0]) for r in rows))


def report_llamacpp(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Steps 6-7: the GGUF (written once), then llama.cpp's run."""
    if args.gguf.exists():
        log(f"reusing {args.gguf}")
    else:
        results["gguf"] = run_child("gguf", args)
    results["llamacpp"] = run_child("llamacpp", args)


def side_by_side(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Ours, llama.cpp and ours / llama.cpp: decode b=1 and warm prefill tokens/s, peak RSS GiB."""
    ours, theirs = results.get("decode", {}), results.get("llamacpp", {})
    figures = [(f"decode b=1, tokens/s (prompt {args.prompt_tokens})",
                lambda r: 1 / r["median_step_seconds"]),
               ("decode b=1, int8 activations as llama.cpp's, tokens/s",
                lambda r: 1 / r.get("int8_median_step_seconds", r["median_step_seconds"])),
               (f"prefill {args.prefill_tokens} tokens (warm), tokens/s",
                lambda r: args.prefill_tokens / r["long_prefill_seconds"]),
               ("peak RSS, GiB", lambda r: r["peak_rss"] / GIB)]
    rows = []
    for name, figure in figures:
        a, b = (figure(r) if r else None for r in (ours, theirs))
        rows.append((name, common.fmt(a), common.fmt(b), common.fmt(common.ratio(a, b))))
    print()
    common.print_table(rows, (10, 11, 16), header=("", "ours", "llama.cpp", "ours/llama.cpp"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="gpt-oss-20b in the released layout (default: synthetic)")
    parser.add_argument("--work", type=Path, default=Path("bench-mxfp4-20b"), help="where the files go")
    parser.add_argument("--dst", type=Path, help="converted checkpoint (default: WORK/orbax-mxfp4)")
    parser.add_argument("--gguf", type=Path, help="llama.cpp's file (default: WORK/gpt-oss-20b-mxfp4-DTYPE.gguf)")
    parser.add_argument("--gguf-dtype", choices=("bf16", "q8_0"), default="bf16", help="its non-expert matrices")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--skip-convert", action="store_true", help="reuse an existing --dst")
    parser.add_argument("--skip-ours", action="store_true", help="run llama.cpp only")
    parser.add_argument("--skip-llamacpp", action="store_true", help="run gptoss-jax only")
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
    args.gguf = args.gguf or args.work / f"gpt-oss-20b-mxfp4-{args.gguf_dtype}.gguf"
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}}
    if not args.skip_ours:  # one after the other: both at once would not fit in 24 GiB
        report_ours(args, results)
    if not args.skip_llamacpp:
        report_llamacpp(args, results)
    side_by_side(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
