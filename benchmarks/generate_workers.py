"""bench_generate.py's child processes: writing the weights, gptoss-jax, gptoss-jax long context, and
transformers. Each takes the parsed arguments and the size table and returns its figures as a dict."""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import common
from common import GIB, MIB, log

CONFIG_PATH = common.REPO / "configs" / "bench.json"
CHUNK = 512  # gptoss_jax.generate.prefill's default chunk


def timed_pair(run: Callable[[int], Any], n: int, repeats: int) -> dict[str, Any]:
    """Decode timing: best time of `run(n + 1)` minus best of `run(1)` (interleaved repeats)."""
    one, many, out = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = run(n + 1)
        many.append(time.perf_counter() - start)
    return {"t_1": one, "t_n_plus_1": many, "seconds_for_n": min(many) - min(one), "new_tokens": n, "tokens": out}


def timed_decode(name: str, run: Callable[[int], Any], n: int, rows: int, repeats: int,
                 phase: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Warm-up (`run(1)`, `run(n + 1)`: compilation for gptoss-jax), then `timed_pair`; tokens/s of
    all `rows` together. `phase("warmup" | "timed")` is called as each part starts (compile counting)."""
    log(f"{name}: warm-up")
    phase("warmup")
    start = time.perf_counter()
    run(1)
    run(n + 1)
    warm_s = time.perf_counter() - start
    phase("timed")
    log(f"{name}: timing {repeats} x (1 and {n + 1} new tokens)")
    timing = timed_pair(run, n, repeats)
    timing["warmup_seconds"] = warm_s
    timing["tokens_per_s"] = n * rows / timing["seconds_for_n"]
    timing["loadavg"] = os.getloadavg()
    log(f"  {timing['tokens_per_s']:.2f} tok/s")
    return timing


def decode_cases(sizes: dict) -> tuple[tuple[str, str, str], ...]:
    """(figure name, prompts key, size key of its new tokens) of the two decode figures."""
    return (("decode_b1", "b1", "decode_new"), ("decode_b8", "b8", "batch_new"))


def prompts(sizes: dict, vocab: int, seed: int = 1) -> dict[str, Any]:
    """Random ordinary-token prompts of the sizes' shapes (the same on both sides)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    high = min(vocab, 199998)  # ordinary tokens (specials start at 199998)
    return {"b1": rng.integers(0, high, (1, sizes["prompt"])).astype(np.int32),
            "b8": rng.integers(0, high, (sizes["batch"], sizes["prompt"])).astype(np.int32),
            "prefill": rng.integers(0, high, (1, sizes["prefill"])).astype(np.int32),
            "long": rng.integers(0, high, (1, sizes["long"])).astype(np.int32)}


def load_hf_tensors(weights_dir: Path) -> dict[str, Any]:
    """The cached weights, read into memory (not memory-mapped: jax may alias a mapped file's pages,
    which would then enter the RSS only when first touched, inside a measurement)."""
    import numpy as np

    manifest = json.loads((weights_dir / "manifest.json").read_text())
    return {name: np.load(weights_dir / f"{name}.npy") for name in manifest["names"]}


def worker_init(args: argparse.Namespace, sizes: dict) -> dict:
    """Writes init_params(config, seed, float32) in Hugging Face layout as .npy files."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.config import load_config
    from gptoss_jax.params import init_params, params_to_hf

    config = load_config(CONFIG_PATH)
    start = time.perf_counter()
    params = init_params(config, args.seed, jnp.float32)
    jax.block_until_ready(params)
    out = Path(args.weights_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name, array in params_to_hf(config, params):
        np.save(out / f"{name}.npy", np.ascontiguousarray(array, np.float32))
        names.append(name)
    (out / "manifest.json").write_text(json.dumps({"names": names, "seed": args.seed,
                                                   "config": config.to_hf_dict()}))
    return {"seconds": time.perf_counter() - start}


def _load_jax_params(args: argparse.Namespace) -> tuple[Any, Any, float]:
    import jax
    import jax.numpy as jnp

    from gptoss_jax.config import load_config
    from gptoss_jax.params import params_from_hf

    config = load_config(CONFIG_PATH)
    start = time.perf_counter()
    dtype = jnp.dtype(getattr(args, "dtype", "float32"))
    params = params_from_hf(config, load_hf_tensors(Path(args.weights_dir)), dtype, source=args.weights_dir)
    jax.block_until_ready(params)
    return config, params, time.perf_counter() - start


def weights_dtype(params: Any) -> Any:
    """The dtype the weights compute in (the KV cache's)."""
    from gptoss_jax.ops.bits import value_dtype

    return value_dtype(params["embed"])


def _loaded(args: argparse.Namespace, counter: common.CompileCounter) -> tuple[Any, Any, float, int]:
    """The weights loaded (phase "load"), then trimmed: config, params, seconds, RSS."""
    counter.phase = "load"
    config, params, load_s = _load_jax_params(args)
    common.trim()
    log(f"weights loaded in {load_s:.1f} s, RSS {common.rss() / GIB:.2f} GiB")
    return config, params, load_s, common.rss()


def compile_prefill(config: Any, params: Any, ids: Any, slots: int, counter: common.CompileCounter) -> dict[str, Any]:
    """Compiles `prefill`'s executables for a cache of `slots` ahead of time (jit reuses them), then
    runs the prompt's first two chunks through them with the same shapes, which compiles the few
    small ops that prefill and sampling dispatch one by one (a later chunk's inputs are an earlier
    one's outputs: in bfloat16 the second chunk compiled again, during the timed runs). Time and
    memory of each part."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.cache import init_cache
    from gptoss_jax.generate import Sampling, _logits, extend, prefill, sample

    chunk = min(CHUNK, ids.shape[1])
    out: dict[str, Any] = {}
    common.trim()
    with common.PeakRSS() as peak:
        start = time.perf_counter()
        cache = init_cache(config, ids.shape[0], slots, weights_dtype(params))
        tokens = jnp.zeros((ids.shape[0], chunk), jnp.int32)
        extend.lower(config, params, cache, tokens, tokens).compile()
        _logits.lower(config, params, jnp.zeros((ids.shape[0], config.hidden), jnp.float32)).compile()
        out["compile_seconds"] = time.perf_counter() - start
    out["compile_extra_rss"] = peak.peak - peak.start
    phase, counter.phase = counter.phase, counter.phase + "_one_chunk"
    common.trim()
    with common.PeakRSS() as peak:
        start = time.perf_counter()
        warm = min(2 * chunk, ids.shape[1])
        logits, cache = prefill(config, params, cache, ids[:, :warm], np.full(ids.shape[0], warm, np.int32), chunk)
        sample(logits, jax.random.fold_in(jax.random.key(0), 0), Sampling()).block_until_ready()
        del cache, logits
        out["warmup_chunk_seconds"] = time.perf_counter() - start
    out["warmup_chunk_activation_bytes"] = peak.peak - peak.start
    counter.phase = phase
    return out


def _prefill_figures(measured: dict, length: int, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Saves the prefill's last-token logits beside the result file; its figures with `extra`."""
    import numpy as np

    np.save(Path(args.result).with_suffix(".logits.npy"), measured.pop("result"))
    measured.update(**extra, tokens_per_s=length / measured["best_seconds"], loadavg=os.getloadavg())
    log(f"  {measured['tokens_per_s']:.1f} tok/s, activation {measured['activation_bytes'] / MIB:.0f} MiB")
    return measured


def worker_jax(args: argparse.Namespace, sizes: dict) -> dict:
    """gptoss-jax: bandwidth, batch-1 and batch-8 decode through `generate`, a chunked prefill."""
    counter = common.count_compiles()
    import jax.numpy as jnp
    import numpy as np

    import gptoss_jax
    from gptoss_jax.cache import init_cache
    from gptoss_jax.generate import prefill

    result: dict[str, Any] = {}
    counter.phase = "bandwidth"
    log("matvec bandwidth (XLA float32)")
    result["bandwidth"] = common.matvec_bandwidth(sizes["matvec_shape"])
    log(f"  {result['bandwidth']['gb_per_s']:.1f} GB/s")
    gc.collect()
    config, params, result["load_seconds"], result["rss_weights"] = _loaded(args, counter)
    data = prompts(sizes, config.vocab_size)
    repeats = args.repeats or sizes["repeats"]

    for name, key, new in decode_cases(sizes):
        def run(n: int, batch_prompts: Any = data[key]) -> list[list[int]]:
            return gptoss_jax.generate(config, params, batch_prompts.tolist(), max_new_tokens=n, stop_tokens=[])

        result[name] = timed_decode(name, run, sizes[new], len(data[key]), repeats,
                                    lambda phase, name=name: setattr(counter, "phase", f"{name}_{phase}"))

    length, ids = sizes["prefill"], data["prefill"]

    def run_prefill() -> Any:
        cache = init_cache(config, 1, length, weights_dtype(params))
        logits, cache = prefill(config, params, cache, ids, np.array([length], np.int32), CHUNK)
        return np.asarray(logits)[0]

    log(f"prefill {length}: compile ahead (same shapes) + one chunk")
    counter.phase = "prefill_warmup"
    warm = compile_prefill(config, params, ids, length, counter)
    counter.phase = "prefill_timed"
    log(f"prefill {length}: {repeats} measured runs")
    result["prefill"] = _prefill_figures(common.measured_runs(run_prefill, repeats), length, args, **warm,
                                         chunk=CHUNK, cache_slots=length)
    result["compiles"], result["compiled"] = counter.counts, counter.names
    return result


def worker_jax_long(args: argparse.Namespace, sizes: dict) -> dict:
    """A long prompt then decoding, as `generate` runs it, with compilation done (and timed) first."""
    counter = common.count_compiles()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.cache import init_cache, used_bytes
    from gptoss_jax.generate import Sampling, _decode_loop, _validate, prefill, sample

    config, params, load_s, rss_weights = _loaded(args, counter)
    length, new = sizes["long"], sizes["long_new"]
    ids = prompts(sizes, config.vocab_size)["long"]
    request = _validate(config, ids.tolist(), new, [])  # generate()'s own shapes (power-of-two buckets)
    prompt_array, lengths = request.prompts, request.lengths
    chunk = min(CHUNK, prompt_array.shape[1])
    sampling, key = Sampling(), jax.random.key(0)
    stops = jnp.asarray(request.stop_tokens)

    # Compile ahead (jit reuses these executables), so that compile time and memory are separate.
    log(f"long: compiling for a {length}-token prompt, cache of {request.max_len} slots")
    counter.phase = "long_compile"
    warm = compile_prefill(config, params, prompt_array, request.max_len, counter)
    cache = init_cache(config, 1, request.max_len, weights_dtype(params))
    cache_bytes = used_bytes(cache)
    start = time.perf_counter()
    decode_loop = _decode_loop.lower(config, sampling, jnp.int32(new), params, cache, jnp.zeros((1,), jnp.int32),
                                     jnp.asarray(lengths), key, stops).compile()  # run below: jit would compile again
    warm["compile_seconds"] += time.perf_counter() - start
    del cache
    splits: list[dict[str, Any]] = []

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        splits.append(out)
        start = time.perf_counter()
        cache = init_cache(config, 1, request.max_len, weights_dtype(params))
        logits, cache = prefill(config, params, cache, prompt_array, lengths, chunk)
        first = sample(logits, jax.random.fold_in(key, 0), sampling)
        first.block_until_ready()
        out["prefill_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        tokens, count, cache = decode_loop(jnp.int32(new), params, cache, first, jnp.asarray(lengths), key, stops)
        out["tokens"] = np.asarray(tokens)[0][: int(count[0])].tolist()
        out["decode_seconds"] = time.perf_counter() - start
        return out

    log(f"long: {args.long_repeats or sizes['long_repeats']} run(s) of prefill {length} + decode {new}")
    counter.phase = "long_timed"
    measured = common.measured_runs(run, args.long_repeats or sizes["long_repeats"])
    measured.pop("result")
    best_prefill = min(r["prefill_seconds"] for r in splits)
    best_decode = min(r["decode_seconds"] for r in splits)
    result = {"prompt": length, "new_tokens": new, "cache_slots_full_layers": request.max_len,
              "cache_bytes": cache_bytes, "chunk": chunk, "load_seconds": load_s, "rss_weights": rss_weights,
              **warm,
              "prefill_seconds": best_prefill, "decode_seconds": best_decode,
              "prefill_tokens_per_s": length / best_prefill,
              # the first new token comes from the prefill's logits; the loop makes new - 1 steps
              "decode_tokens_per_s": (new - 1) / best_decode,
              "total_seconds": best_prefill + best_decode, "splits": splits, "loadavg": os.getloadavg(), **measured,
              "ru_maxrss_bytes": common.max_rss(), "compiles": counter.counts, "compiled": counter.names}
    log(f"  prefill {result['prefill_seconds']:.1f} s, decode {result['decode_tokens_per_s']:.2f} tok/s, "
        f"peak RSS {max(r['peak_rss'] for r in measured['runs']) / GIB:.2f} GiB")
    return result


def hf_model(config_path: Path, weights_dir: Path, dtype: str = "float32") -> tuple[Any, dict[str, Any]]:
    """transformers' GptOssForCausalLM (eager attention, float32 or `dtype`) of `config_path` with the
    weights of `weights_dir` (a strict `load_state_dict`): the model, and how long it took and what it holds."""
    import numpy as np
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.initialization import no_init_weights

    hf_config = json.loads(Path(config_path).read_text())
    hf_config.pop("architectures", None)
    start = time.perf_counter()
    with no_init_weights():
        model = GptOssForCausalLM(GptOssConfig(**hf_config, attn_implementation="eager"))
    model = model.float().eval()
    tensors = load_hf_tensors(weights_dir)
    state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in tensors.items()}
    missing = model.load_state_dict(state, strict=True)
    del state, tensors
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    common.trim()
    return model, {"load_seconds": time.perf_counter() - start, "rss_weights": common.rss(),
                   "attn_implementation": model.config._attn_implementation,
                   "experts_implementation": model.config._experts_implementation, "load_state_dict": str(missing)}


def worker_hf(args: argparse.Namespace, sizes: dict) -> dict:
    """transformers' GptOssForCausalLM (eager attention, float32) on the same weights and prompts."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "transformers": transformers.__version__,
                              "torch": torch.__version__}
    log("matvec bandwidth (torch float32, for reference)")
    result["bandwidth"] = common.matvec_bandwidth_torch(sizes["matvec_shape"])
    log(f"  {result['bandwidth']['gb_per_s']:.1f} GB/s")

    model, loaded = hf_model(CONFIG_PATH, Path(args.weights_dir), args.dtype)
    config = model.config
    result.update(loaded)
    log(f"weights loaded in {result['load_seconds']:.1f} s, RSS {common.rss() / GIB:.2f} GiB; attention "
        f"{result['attn_implementation']}, experts {result['experts_implementation']}")
    data = prompts(sizes, config.vocab_size)
    repeats = args.repeats or sizes["repeats"]

    for name, key, new in decode_cases(sizes):
        def run(n: int, ids: torch.Tensor = torch.from_numpy(data[key]).long()) -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=config.pad_token_id)
            return out[:, ids.shape[1]:].tolist()

        result[name] = timed_decode(name, run, sizes[new], len(data[key]), repeats)

    length = sizes["prefill"]
    ids = torch.from_numpy(data["prefill"]).long()

    def run_prefill() -> Any:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().numpy().copy()

    log(f"prefill {length}: warm-up ({min(CHUNK, length)} tokens)")
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids[:, :CHUNK], use_cache=True, logits_to_keep=1)
    warm_s = time.perf_counter() - start
    log(f"prefill {length}: {repeats} measured runs")
    result["prefill"] = _prefill_figures(common.measured_runs(run_prefill, repeats), length, args,
                                         warmup_seconds=warm_s, call="model(input_ids, use_cache=True, "
                                         "logits_to_keep=1) under torch.no_grad()")
    return result


def worker_breakdown(args: argparse.Namespace, sizes: dict) -> dict:
    """See `generate_breakdown.worker_breakdown`."""
    from generate_breakdown import worker_breakdown as breakdown

    return breakdown(args, sizes)


WORKERS = {"init": worker_init, "breakdown": worker_breakdown, "jax": worker_jax, "jax_long": worker_jax_long,
           "hf": worker_hf}
