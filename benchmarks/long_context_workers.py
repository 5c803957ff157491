"""bench_long_context.py's child processes: gptoss-jax and transformers at one context length each
(prefill, decode, peak RSS), gptoss-jax's long run on the small 64/8-head config, and both sides'
greedy tokens for the parity check. Each takes the parsed arguments and returns its figures as a dict.

The weights are written and read with generate_workers' helpers (`worker_init`, `_loaded`), which
read the config from `generate_workers.CONFIG_PATH`: each worker here points that at `--config`
first (one config per child process).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import common
import generate_workers
from common import GIB, log
from generate_workers import CHUNK


def use_config(args: argparse.Namespace) -> None:
    """Points generate_workers' loaders at this worker's config."""
    generate_workers.CONFIG_PATH = Path(args.config)


def random_prompt(vocab: int, length: int, seed: int) -> Any:
    """Random ordinary tokens int32 [length] (specials start at 199998), the same on both sides."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, min(vocab, 199998), length).astype(np.int32)


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two token lists (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------
# gptoss-jax

class SplitTimer:
    """Times the public `generate` in two parts, from the outside: wraps `gptoss_jax.generate`'s
    `_decode_loop` (the call that follows the prefill) so that it first blocks on the prefill's first
    token and then on its own result. `prefill_s` = from the call of `generate` to the first token
    ready; `decode_s` = the decode loop (max_new_tokens - 1 steps)."""

    def __init__(self) -> None:
        self.module = importlib.import_module("gptoss_jax.generate")  # `gptoss_jax.generate` is the function
        self.real = self.module._decode_loop
        self.marks: dict[str, float] = {}

    def __enter__(self) -> SplitTimer:
        import jax

        def timed_loop(*args: Any, **kwargs: Any) -> Any:
            jax.block_until_ready(args[5])  # `first`: the prefill is done
            self.marks["first_ready"] = time.perf_counter()
            out = jax.block_until_ready(self.real(*args, **kwargs))
            self.marks["loop_done"] = time.perf_counter()
            return out

        self.module._decode_loop = timed_loop
        return self

    def __exit__(self, *exc: Any) -> None:
        self.module._decode_loop = self.real

    def run(self, call: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        """`call()` (a `generate`) -> (its result, {total_s, prefill_s, decode_s})."""
        self.marks.clear()
        start = time.perf_counter()
        out = call()
        end = time.perf_counter()
        return out, {"total_s": end - start, "prefill_s": self.marks["first_ready"] - start,
                     "decode_s": self.marks["loop_done"] - self.marks["first_ready"]}


def warm_up(config: Any, params: Any, prompt: Any, new_tokens: tuple[int, ...]) -> float:
    """Compiles everything `generate(config, params, [prompt], n, stop_tokens=[])` runs, for each n
    of `new_tokens`, by running its pieces with the same shapes on the prompt's first chunk only:
    `_start` (cache, prefill chunk, logits, sampling) and `_decode_loop` (one step), through jit as
    `generate` calls them. Returns the seconds it took."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.generate import Sampling, _decode_loop, _start, _validate
    from gptoss_jax.ops.bits import as_bits

    start = time.perf_counter()
    bits, sampling, key = as_bits(params), Sampling(), jax.random.key(0)
    for n in dict.fromkeys(new_tokens):
        request = _validate(config, [prompt.tolist()], n, [])
        chunk = min(CHUNK, request.prompts.shape[1])
        short = dataclasses.replace(request, prompts=request.prompts[:, :chunk],
                                    lengths=np.minimum(request.lengths, chunk))
        first, cache = _start(config, bits, short, sampling, key, CHUNK)
        out = _decode_loop(config, sampling, jnp.int32(1), bits, cache, first, jnp.asarray(short.lengths), key,
                           jnp.asarray(request.stop_tokens))
        jax.block_until_ready(out)
        del out, cache
    return time.perf_counter() - start


def worker_jax_context(args: argparse.Namespace) -> dict:
    """gptoss-jax at one context: `generate(prompt, 1)` x `--prefill-repeats` (prefill figure) and
    `generate(prompt, N + 1)` x `--repeats`, split into prefill and decode loop by `SplitTimer`."""
    counter = common.count_compiles()
    import gptoss_jax
    from gptoss_jax.cache import abstract_cache, used_bytes
    from gptoss_jax.generate import _validate

    use_config(args)
    config, params, load_s, rss_weights = generate_workers._loaded(args, counter)
    length, n = args.context, args.new
    prompt = random_prompt(config.vocab_size, length, args.seed + 1)
    rows = [prompt.tolist()]
    max_len = _validate(config, rows, n + 1, []).max_len
    log(f"context {length}: warm-up (compiles for a cache of {max_len} slots, runs one chunk)")
    counter.phase = "warmup"
    warm_s = warm_up(config, params, prompt, (1, n + 1))
    common.trim()
    counter.phase = "timed"
    result: dict[str, Any] = {"context": length, "new_tokens": n, "cache_slots_full_layers": max_len,
                              "cache_bytes": used_bytes(abstract_cache(config, 1, max_len, params["embed"].dtype)),
                              "load_seconds": load_s, "rss_weights": rss_weights, "warmup_seconds": warm_s,
                              "generate_1": [], "generate_n_plus_1": []}
    with common.PeakRSS() as peak, SplitTimer() as timer:
        result["rss_before"] = peak.start
        for _ in range(args.prefill_repeats):
            log(f"context {length}: generate(max_new_tokens=1)")
            _, t = timer.run(lambda: gptoss_jax.generate(config, params, rows, max_new_tokens=1, stop_tokens=[]))
            result["generate_1"].append(t)
            log(f"  {t['total_s']:.2f} s ({length / t['total_s']:.0f} tok/s)")
        for _ in range(args.repeats):
            log(f"context {length}: generate(max_new_tokens={n + 1})")
            out, t = timer.run(lambda: gptoss_jax.generate(config, params, rows, max_new_tokens=n + 1, stop_tokens=[]))
            result["generate_n_plus_1"].append(t)
            result["tokens"] = out[0]
            log(f"  {t['total_s']:.2f} s: prefill {t['prefill_s']:.2f} s, decode {n} steps {t['decode_s']:.3f} s "
                f"({n / t['decode_s']:.2f} tok/s)")
    g1, gn = result["generate_1"], result["generate_n_plus_1"]
    result["prefill_via"] = "generate(max_new_tokens=1)" if g1 else f"generate({n + 1}), until the first token"
    result["prefill_seconds"] = min(t["total_s"] for t in g1) if g1 else min(t["prefill_s"] for t in gn)
    result["prefill_tokens_per_s"] = length / result["prefill_seconds"]
    result["decode_seconds"] = min(t["decode_s"] for t in gn)
    result["decode_tokens_per_s"] = n / result["decode_seconds"]
    if g1:  # the brief's figure: (generate(N + 1) - generate(1)) / N, best of each
        diff = min(t["total_s"] for t in gn) - min(t["total_s"] for t in g1)
        result["decode_tokens_per_s_by_difference"] = n / diff if diff > 0 else None
    result.update(peak_rss=peak.peak, peak_over_weights=peak.peak - rss_weights, ru_maxrss_bytes=common.max_rss(),
                  loadavg=os.getloadavg(), compiles=counter.counts, compiled=counter.names)
    log(f"context {length}: prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode "
        f"{result['decode_tokens_per_s']:.2f} tok/s, peak RSS {peak.peak / GIB:.2f} GiB")
    return result


def worker_jax_long(args: argparse.Namespace) -> dict:
    """The small 64/8-head config filled to `--context` tokens: a prompt of context - N tokens, then
    N new ones, in one public `generate` call split by `SplitTimer`; memory against the bound."""
    counter = common.count_compiles()
    import jax

    import gptoss_jax
    from gptoss_jax.cache import abstract_cache, used_bytes
    from gptoss_jax.generate import _validate

    use_config(args)
    config, params, load_s, rss_weights = generate_workers._loaded(args, counter)
    n = args.new
    length = min(args.context, config.max_positions - n)
    prompt = random_prompt(config.vocab_size, length, args.seed + 2)
    rows = [prompt.tolist()]
    max_len = _validate(config, rows, n, []).max_len
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    cache_bytes = used_bytes(abstract_cache(config, 1, max_len, params["embed"].dtype))
    log(f"long: warm-up for a {length}-token prompt + {n} new, cache of {max_len} slots")
    counter.phase = "warmup"
    warm_s = warm_up(config, params, prompt, (n,))
    common.trim()
    counter.phase = "timed"
    log(f"long: generate(max_new_tokens={n}) on {length} tokens")
    with common.PeakRSS() as peak, SplitTimer() as timer:
        out, t = timer.run(lambda: gptoss_jax.generate(config, params, rows, max_new_tokens=n, stop_tokens=[]))
    bound = weight_bytes + cache_bytes + 2 * GIB
    result = {"config": config.name, "prompt": length, "new_tokens": n, "context": length + n,
              "cache_slots_full_layers": max_len, "weight_bytes": weight_bytes, "cache_bytes": cache_bytes,
              "load_seconds": load_s, "rss_weights": rss_weights, "warmup_seconds": warm_s, "rss_before": peak.start,
              **t, "prefill_tokens_per_s": length / t["prefill_s"], "decode_tokens_per_s": (n - 1) / t["decode_s"],
              "tokens": out[0], "peak_rss": peak.peak, "ru_maxrss_bytes": common.max_rss(),
              "rss_bound": bound, "rss_within_bound": peak.peak <= bound, "loadavg": os.getloadavg(),
              "compiles": counter.counts, "compiled": counter.names}
    log(f"long: prefill {t['prefill_s']:.1f} s ({result['prefill_tokens_per_s']:.0f} tok/s), decode "
        f"{result['decode_tokens_per_s']:.2f} tok/s, peak RSS {peak.peak / GIB:.2f} GiB (bound {bound / GIB:.2f})")
    return result


def worker_jax_parity(args: argparse.Namespace) -> dict:
    """gptoss-jax's greedy tokens through the public `generate`."""
    import gptoss_jax

    counter = common.count_compiles()
    use_config(args)
    config, params, _, _ = generate_workers._loaded(args, counter)
    prompt = random_prompt(config.vocab_size, args.context, args.seed + 3)
    start = time.perf_counter()
    tokens = gptoss_jax.generate(config, params, [prompt.tolist()], max_new_tokens=args.new, stop_tokens=[])[0]
    return {"prompt": args.context, "new_tokens": args.new, "tokens": tokens, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# transformers

def hf_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """transformers' GptOssForCausalLM, eager attention, float32, on the weights of --weights-dir
    (a strict `load_state_dict`), 2 torch threads; the model and what describes it."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    model, info = generate_workers.hf_model(Path(args.config), Path(args.weights_dir))
    info.update(torch_threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                transformers=transformers.__version__, torch=torch.__version__)
    log(f"transformers model loaded in {info['load_seconds']:.1f} s, RSS {info['rss_weights'] / GIB:.2f} GiB")
    return model, info


def worker_hf_context(args: argparse.Namespace) -> dict:
    """transformers at one context: `--repeats` x (prefill = `model(ids, use_cache=True,
    logits_to_keep=1)`, then N greedy steps with its cache, each `model(next, cache=...)`)."""
    import torch

    model, info = hf_model(args)
    length, n = args.context, args.new
    ids = torch.from_numpy(random_prompt(model.config.vocab_size, length, args.seed + 1)).long()[None]
    log(f"context {length}: warm-up ({min(CHUNK, length)} tokens)")
    with torch.no_grad():
        model(input_ids=ids[:, :CHUNK], use_cache=True, logits_to_keep=1)
    common.trim()
    runs = []
    with common.PeakRSS() as peak, torch.no_grad():
        rss_before = peak.start
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
            prefill_s = time.perf_counter() - start
            tokens, cache = [int(token)], out.cache
            del out
            start = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=token[:, None], cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1)
                tokens.append(int(token))
                cache = out.cache
            decode_s = time.perf_counter() - start
            del cache, out
            runs.append({"prefill_s": prefill_s, "decode_s": decode_s})
            log(f"  prefill {prefill_s:.2f} s ({length / prefill_s:.0f} tok/s), decode {n / decode_s:.2f} tok/s")
    result = {**info, "context": length, "new_tokens": n, "runs": runs, "tokens": tokens,
              "prefill_call": "model(input_ids, use_cache=True, logits_to_keep=1) under torch.no_grad()",
              "prefill_seconds": min(r["prefill_s"] for r in runs), "decode_seconds": min(r["decode_s"] for r in runs),
              "rss_before": rss_before, "peak_rss": peak.peak, "peak_over_weights": peak.peak - info["rss_weights"],
              "ru_maxrss_bytes": common.max_rss(), "loadavg": os.getloadavg()}
    result["prefill_tokens_per_s"] = length / result["prefill_seconds"]
    result["decode_tokens_per_s"] = n / result["decode_seconds"]
    return result


def worker_hf_parity(args: argparse.Namespace) -> dict:
    """transformers' greedy tokens through `model.generate` (do_sample=False)."""
    import torch

    model, info = hf_model(args)
    ids = torch.from_numpy(random_prompt(model.config.vocab_size, args.context, args.seed + 3)).long()[None]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                             min_new_tokens=args.new, do_sample=False, pad_token_id=model.config.pad_token_id)
    return {**info, "prompt": args.context, "new_tokens": args.new, "tokens": out[0, ids.shape[1]:].tolist(),
            "seconds": time.perf_counter() - start, "peak_rss": common.max_rss()}


def worker_init(args: argparse.Namespace) -> dict:
    """generate_workers' weight writer for this worker's config."""
    use_config(args)
    return generate_workers.worker_init(args, {})


WORKERS = {"init": worker_init, "jax_context": worker_jax_context, "hf_context": worker_hf_context,
           "jax_long": worker_jax_long, "jax_parity": worker_jax_parity, "hf_parity": worker_hf_parity}
