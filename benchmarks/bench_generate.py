"""gptoss-jax against transformers' `GptOssForCausalLM` on the same random weights, side by side.

    python benchmarks/bench_generate.py [--quick] [--json results.json]

One run measures, on `configs/bench.json` (8 layers, 32 experts top-4, vocab 201088) in float32:

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
only that). The full run takes 10 to 13 minutes on the 2-core machines, more when they are busy.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO / "configs" / "bench.json"
MIB, GIB = 1 << 20, 1 << 30
CHUNK = 512  # gptoss_jax.generate.prefill's default chunk

SIZES = {
    "full": dict(prompt=32, decode_new=64, batch=8, batch_new=32, prefill=4096, long=16384, long_new=64,
                 repeats=3, long_repeats=1, matvec_shape=(12288, 8192)),
    "quick": dict(prompt=32, decode_new=8, batch=8, batch_new=4, prefill=512, long=1024, long_new=16,
                  repeats=2, long_repeats=1, matvec_shape=(8192, 8192)),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} {os.environ.get('BENCH_WORKER', 'main')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Memory and timing helpers (used in the child processes)

def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def trim() -> None:
    """Frees what Python and glibc hold but do not use, so that the RSS is the memory in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples this process's RSS every `interval` seconds in a thread; `.peak` after the block."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measured_runs(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Runs `fn` `repeats` times, each after a trim; per run: seconds, RSS before, peak RSS during."""
    runs, result = [], None
    for _ in range(repeats):
        result = None
        trim()
        with PeakRSS() as peak:
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
        runs.append({"seconds": seconds, "rss_before": peak.start, "peak_rss": peak.peak,
                     "activation_bytes": peak.peak - peak.start})
    return {"runs": runs, "best_seconds": min(r["seconds"] for r in runs),
            "activation_bytes": max(r["activation_bytes"] for r in runs),
            "baseline_rss": min(r["rss_before"] for r in runs), "result": result}


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


def prompts(sizes: dict, vocab: int, seed: int = 1) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)

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


class CompileCounter(logging.Handler):
    """Counts `jax_log_compiles` messages per phase (and passes other warnings on to stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.phase = "setup"
        self.counts: dict[str, int] = {}
        self.names: dict[str, list[str]] = {}
        self._stderr = logging.StreamHandler(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
            self.names.setdefault(self.phase, []).append(message.split(" with ")[0][len("Compiling "):])
        elif record.levelno >= logging.WARNING and not (message.startswith("Finished ") or "compil" in message.lower()):
            self._stderr.emit(record)


def _jax_setup() -> tuple[Any, CompileCounter]:
    import jax

    jax.config.update("jax_log_compiles", True)
    counter = CompileCounter()
    jax_logger = logging.getLogger("jax")
    jax_logger.handlers = [counter]
    jax_logger.setLevel(logging.DEBUG)
    jax_logger.propagate = False
    return jax, counter


def _load_jax_params(args: argparse.Namespace) -> tuple[Any, Any, float]:
    import jax
    import jax.numpy as jnp

    from gptoss_jax.config import load_config
    from gptoss_jax.params import params_from_hf

    config = load_config(CONFIG_PATH)
    start = time.perf_counter()
    params = params_from_hf(config, load_hf_tensors(Path(args.weights_dir)), jnp.float32, source=args.weights_dir)
    jax.block_until_ready(params)
    return config, params, time.perf_counter() - start


def matvec_bandwidth_jax(shape: tuple[int, int], repeats: int = 20) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    matrix = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    vector = jnp.ones((shape[1],), jnp.float32)
    matvec = jax.jit(lambda a, x: a @ x)
    matvec(matrix, vector).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matvec(matrix, vector).block_until_ready()
        times.append(time.perf_counter() - start)
    nbytes = matrix.size * 4
    return {"bytes": nbytes, "best_seconds": min(times), "median_seconds": sorted(times)[len(times) // 2],
            "gb_per_s": nbytes / min(times) / 1e9, "median_gb_per_s": nbytes / sorted(times)[len(times) // 2] / 1e9}


def compile_prefill(config: Any, params: Any, ids: Any, slots: int, counter: CompileCounter) -> dict[str, Any]:
    """Compiles `prefill`'s executables for a cache of `slots` ahead of time (jit reuses them), then
    runs the prompt's first chunk through them with the same shapes, which compiles the few small
    ops that prefill and sampling dispatch one by one. Time and memory of each part."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.cache import init_cache
    from gptoss_jax.generate import Sampling, _logits, extend, prefill, sample

    chunk = min(CHUNK, ids.shape[1])
    out: dict[str, Any] = {}
    trim()
    with PeakRSS() as peak:
        start = time.perf_counter()
        cache = init_cache(config, ids.shape[0], slots, jnp.float32)
        tokens = jnp.zeros((ids.shape[0], chunk), jnp.int32)
        extend.lower(config, params, cache, tokens, tokens).compile()
        _logits.lower(config, params, jnp.zeros((ids.shape[0], config.hidden), jnp.float32)).compile()
        out["compile_seconds"] = time.perf_counter() - start
    out["compile_extra_rss"] = peak.peak - peak.start
    phase, counter.phase = counter.phase, counter.phase + "_one_chunk"
    trim()
    with PeakRSS() as peak:
        start = time.perf_counter()
        logits, cache = prefill(config, params, cache, ids[:, :chunk], np.full(ids.shape[0], chunk, np.int32), chunk)
        sample(logits, jax.random.fold_in(jax.random.key(0), 0), Sampling()).block_until_ready()
        del cache, logits
        out["warmup_chunk_seconds"] = time.perf_counter() - start
    out["warmup_chunk_activation_bytes"] = peak.peak - peak.start
    counter.phase = phase
    return out


def worker_jax(args: argparse.Namespace, sizes: dict) -> dict:
    jax, counter = _jax_setup()
    import jax.numpy as jnp
    import numpy as np

    import gptoss_jax
    from gptoss_jax.cache import init_cache
    from gptoss_jax.generate import prefill

    result: dict[str, Any] = {}
    counter.phase = "bandwidth"
    log("matvec bandwidth (XLA float32)")
    result["bandwidth"] = matvec_bandwidth_jax(tuple(sizes["matvec_shape"]))
    log(f"  {result['bandwidth']['gb_per_s']:.1f} GB/s")
    gc.collect()

    counter.phase = "load"
    config, params, load_s = _load_jax_params(args)
    trim()
    result["load_seconds"], result["rss_weights"] = load_s, rss()
    log(f"weights loaded in {load_s:.1f} s, RSS {rss() / GIB:.2f} GiB")
    data = prompts(sizes, config.vocab_size)
    repeats = args.repeats or sizes["repeats"]

    for name, batch_prompts, n in (("decode_b1", data["b1"], sizes["decode_new"]),
                                   ("decode_b8", data["b8"], sizes["batch_new"])):
        def run(new: int, batch_prompts: Any = batch_prompts) -> list[list[int]]:
            return gptoss_jax.generate(config, params, batch_prompts.tolist(), max_new_tokens=new, stop_tokens=[])

        result[name] = timed_decode(name, run, n, len(batch_prompts), repeats,
                                    lambda phase: setattr(counter, "phase", f"{name}_{phase}"))

    length = sizes["prefill"]
    ids = data["prefill"]

    def run_prefill() -> Any:
        cache = init_cache(config, 1, length, jnp.float32)
        logits, cache = prefill(config, params, cache, ids, np.array([length], np.int32), CHUNK)
        return np.asarray(logits)[0]

    log(f"prefill {length}: compile ahead (same shapes) + one chunk")
    counter.phase = "prefill_warmup"
    warm = compile_prefill(config, params, ids, length, counter)
    counter.phase = "prefill_timed"
    log(f"prefill {length}: {repeats} measured runs")
    measured = measured_runs(run_prefill, repeats)
    logits = measured.pop("result")
    np.save(Path(args.result).with_suffix(".logits.npy"), logits)
    measured.update(**warm, tokens_per_s=length / measured["best_seconds"], chunk=CHUNK, cache_slots=length,
                    loadavg=os.getloadavg())
    result["prefill"] = measured
    log(f"  {measured['tokens_per_s']:.1f} tok/s, activation {measured['activation_bytes'] / MIB:.0f} MiB")
    result["compiles"], result["compiled"] = counter.counts, counter.names
    return result


def worker_jax_long(args: argparse.Namespace, sizes: dict) -> dict:
    """A long prompt then decoding, as `generate` runs it, with compilation done (and timed) first."""
    jax, counter = _jax_setup()
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.cache import init_cache, used_bytes
    from gptoss_jax.generate import Sampling, _decode_loop, _validate, prefill, sample

    counter.phase = "load"
    config, params, load_s = _load_jax_params(args)
    trim()
    rss_weights = rss()
    log(f"weights loaded in {load_s:.1f} s, RSS {rss_weights / GIB:.2f} GiB")
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
    cache = init_cache(config, 1, request.max_len, jnp.float32)
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
        cache = init_cache(config, 1, request.max_len, jnp.float32)
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
    measured = measured_runs(run, args.long_repeats or sizes["long_repeats"])
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
              "ru_maxrss_bytes": _ru_maxrss(), "compiles": counter.counts, "compiled": counter.names}
    log(f"  prefill {result['prefill_seconds']:.1f} s, decode {result['decode_tokens_per_s']:.2f} tok/s, "
        f"peak RSS {max(r['peak_rss'] for r in measured['runs']) / GIB:.2f} GiB")
    return result


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_hf(args: argparse.Namespace, sizes: dict) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.initialization import no_init_weights

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "transformers": transformers.__version__,
                              "torch": torch.__version__}

    log("matvec bandwidth (torch float32, for reference)")
    matrix = torch.randn(*sizes["matvec_shape"])
    vector = torch.ones(sizes["matvec_shape"][1])
    times = []
    for _ in range(20):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        times.append(time.perf_counter() - start)
    result["bandwidth"] = {"bytes": matrix.numel() * 4, "best_seconds": min(times),
                           "gb_per_s": matrix.numel() * 4 / min(times) / 1e9}
    del matrix, vector
    log(f"  {result['bandwidth']['gb_per_s']:.1f} GB/s")

    hf_config = json.loads(CONFIG_PATH.read_text())
    hf_config.pop("architectures", None)
    start = time.perf_counter()
    config = GptOssConfig(**hf_config, attn_implementation="eager")
    with no_init_weights():
        model = GptOssForCausalLM(config)
    model = model.float().eval()
    tensors = load_hf_tensors(Path(args.weights_dir))
    state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in tensors.items()}
    missing = model.load_state_dict(state, strict=True)
    del state, tensors
    trim()
    result.update(load_seconds=time.perf_counter() - start, rss_weights=rss(),
                  attn_implementation=model.config._attn_implementation,
                  experts_implementation=model.config._experts_implementation, load_state_dict=str(missing))
    log(f"weights loaded in {result['load_seconds']:.1f} s, RSS {rss() / GIB:.2f} GiB; attention "
        f"{result['attn_implementation']}, experts {result['experts_implementation']}")
    data = prompts(sizes, config.vocab_size)
    repeats = args.repeats or sizes["repeats"]

    for name, batch_prompts, n in (("decode_b1", data["b1"], sizes["decode_new"]),
                                   ("decode_b8", data["b8"], sizes["batch_new"])):
        ids = torch.from_numpy(batch_prompts).long()

        def run(new: int, ids: torch.Tensor = ids) -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=config.pad_token_id)
            return out[:, ids.shape[1]:].tolist()

        result[name] = timed_decode(name, run, n, len(batch_prompts), repeats)

    length = sizes["prefill"]
    ids = torch.from_numpy(data["prefill"]).long()

    def run_prefill() -> Any:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].numpy().copy()

    log(f"prefill {length}: warm-up ({min(CHUNK, length)} tokens)")
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids[:, :CHUNK], use_cache=True, logits_to_keep=1)
    warm_s = time.perf_counter() - start
    log(f"prefill {length}: {repeats} measured runs")
    measured = measured_runs(run_prefill, repeats)
    np.save(Path(args.result).with_suffix(".logits.npy"), measured.pop("result"))
    measured.update(warmup_seconds=warm_s, tokens_per_s=length / measured["best_seconds"], call="model(input_ids, use_cache=True, "
                    "logits_to_keep=1) under torch.no_grad()", loadavg=os.getloadavg())
    result["prefill"] = measured
    log(f"  {measured['tokens_per_s']:.1f} tok/s, activation {measured['activation_bytes'] / MIB:.0f} MiB")
    return result


def worker_breakdown(args: argparse.Namespace, sizes: dict) -> dict:
    """gptoss-jax's pieces timed alone (best of 5, jitted one by one): one prefill chunk and decode
    steps, each split into a full-attention layer, a sliding-window layer, a MoE layer and the
    unembedding, against the whole `extend` / `decode_step`. Uses the model's internals (a layer pair
    is sliced from the stacked weights as `Transformer.__call__` does)."""
    jax, counter = _jax_setup()
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gptoss_jax import attention
    from gptoss_jax import cache as kv_cache
    from gptoss_jax.generate import Sampling, _bucket, _logits, decode_step, extend
    from gptoss_jax.model import EXPERT_MATRICES, _key_name, build

    config, params, _ = _load_jax_params(args)

    def best(fn: Callable, *fn_args: Any, reps: int = 5, fresh: Callable | None = None) -> float:
        times = []
        for i in range(reps + 1):
            call_args = fresh() if fresh else fn_args
            start = time.perf_counter()
            jax.block_until_ready(fn(*call_args))
            if i:
                times.append(time.perf_counter() - start)
        return min(times)

    def layer_pair(params: Any, pair: int = 0) -> Any:
        graph, pair_params = nnx.split(build(config, params).layers)
        sliced = jax.tree_util.tree_map_with_path(
            lambda path, w: w if _key_name(path[-2]) in EXPERT_MATRICES else w[pair], pair_params)
        return nnx.merge(graph, sliced)

    def setup(b: int, t: int, start: int, slots: int) -> tuple[Any, Any, Any]:
        """A cache of `slots` full-layer slots holding positions 0..start-1 (random k, v); new tokens
        at start..start+t-1."""
        cache = kv_cache.init_cache(config, b, slots, jnp.float32)
        full = np.arange(slots)[None].repeat(b, 0)
        cache["full"]["positions"] = jnp.asarray(np.where(full < start, full, -1).astype(np.int32))
        ring = np.full((b, cache["sliding"]["positions"].shape[1]), -1, np.int32)
        for position in range(max(0, start - ring.shape[1]), start):
            ring[:, position % ring.shape[1]] = position
        cache["sliding"]["positions"] = jnp.asarray(ring)
        for kind in kv_cache.KINDS:
            for i, name in enumerate(("k", "v")):
                shape = cache[kind][name].shape
                cache[kind][name] = jax.random.normal(jax.random.key(i), shape, jnp.float32)
        positions = jnp.asarray(np.arange(start, start + t, dtype=np.int32)[None].repeat(b, 0))
        x = jax.random.normal(jax.random.key(3), (b, t, config.hidden), jnp.float32)
        return cache, positions, x

    def pieces(b: int, t: int, start: int, slots: int) -> dict[str, float]:
        cache, positions, x = setup(b, t, start, slots)
        out: dict[str, float] = {}
        for kind, window in (("full", None), ("sliding", config.sliding_window)):
            slot_positions = cache[kind]["positions"]
            write = kv_cache.write_slots(slot_positions, positions, ring=kind == "sliding")
            kv = {"k": cache[kind]["k"][0], "v": cache[kind]["v"][0]}

            @jax.jit
            def attn(params: Any, x: Any, kv: Any, slot_positions: Any, write: Any, positions: Any,
                     kind: str = kind, window: int | None = window) -> Any:
                block = getattr(layer_pair(params), kind)
                rope = attention.rope_cos_sin(config, positions)
                return block.attn(block.attn_norm(x), positions, rope, window, kv, (slot_positions, write))

            out[f"attention layer ({kind}), with cache update"] = best(attn, params, x, kv, slot_positions, write,
                                                                       positions)

        @jax.jit
        def moe_layer(params: Any, x: Any) -> Any:
            block = layer_pair(params).full
            return block.mlp(block.mlp_norm(x), jnp.int32(0))

        out["MoE layer (router + experts)"] = best(moe_layer, params, x)
        out["unembedding (last position)"] = best(jax.jit(lambda p, x: _logits(config, p, x[:, -1])), params, x)
        if b > 1:  # reference: the same product with the operands swapped (another XLA CPU kernel)
            out["  ref: unembedding as einsum('vd,bd->vb')"] = best(
                jax.jit(lambda w, x: jnp.einsum("vd,bd->vb", w, x[:, -1])), params["unembed"], x)
        if t > 1:  # reference: dense matmuls doing the MoE layer's useful FLOPs (t * top-k rows)
            rows = jnp.ones((b * t * config.experts_per_token, config.hidden), jnp.float32)
            expert = (params["layers"]["full"]["mlp"]["gate_up"][0, 0], params["layers"]["full"]["mlp"]["down"][0, 0])
            out["  ref: dense matmuls with the MoE layer's useful FLOPs"] = best(
                jax.jit(lambda r, w1, w2: (r @ w1)[:, : config.intermediate] @ w2), rows, *expert)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 199998, (b, t)).astype(np.int32))

        def fresh() -> tuple:
            copy = jax.tree.map(jnp.copy, cache)
            jax.block_until_ready(copy)
            return (copy,)

        if t > 1:
            out["WHOLE extend (all layers)"] = best(lambda c: extend(config, params, c, tokens, positions),
                                                    reps=3, fresh=fresh)
        else:
            out["WHOLE decode_step (+ argmax)"] = best(
                lambda c: decode_step(config, Sampling(), params, c, tokens[:, 0], positions[:, 0],
                                      jax.random.key(0)), fresh=fresh)
        pairs = config.num_layer_pairs
        out["sum: pairs x (attention full + sliding) + layers x MoE + unembedding"] = (
            pairs * (out["attention layer (full), with cache update"] + out["attention layer (sliding), with cache update"])
            + config.num_layers * out["MoE layer (router + experts)"] + out["unembedding (last position)"])
        return out

    long_slots = min(_bucket(sizes["long"] + sizes["long_new"]), config.max_positions)
    cases = {
        f"prefill chunk {CHUNK} (last of {sizes['prefill']}), cache {sizes['prefill']}":
            dict(b=1, t=CHUNK, start=sizes["prefill"] - CHUNK, slots=sizes["prefill"]),
        f"decode b=1 at {sizes['prompt'] + sizes['decode_new'] // 2}, cache "
        f"{_bucket(sizes['prompt'] + sizes['decode_new'] + 1)}":
            dict(b=1, t=1, start=sizes["prompt"] + sizes["decode_new"] // 2,
                 slots=_bucket(sizes["prompt"] + sizes["decode_new"] + 1)),
        f"decode b={sizes['batch']} at {sizes['prompt'] + sizes['batch_new'] // 2}, cache "
        f"{_bucket(sizes['prompt'] + sizes['batch_new'] + 1)}":
            dict(b=sizes["batch"], t=1, start=sizes["prompt"] + sizes["batch_new"] // 2,
                 slots=_bucket(sizes["prompt"] + sizes["batch_new"] + 1)),
        f"decode b=1 at {sizes['long'] + 16}, cache {long_slots} (generate's bucket)":
            dict(b=1, t=1, start=sizes["long"] + 16, slots=long_slots),
        f"decode b=1 at {sizes['long'] + 16}, cache {sizes['long'] + sizes['long_new']} (exact)":
            dict(b=1, t=1, start=sizes["long"] + 16, slots=sizes["long"] + sizes["long_new"]),
    }
    result = {}
    for name, case in cases.items():
        log(f"breakdown: {name}")
        try:
            result[name] = pieces(**case)
        except Exception as err:  # the internals this uses may change; the benchmark must not fail
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        for piece, seconds in result[name].items():
            log(f"  {piece:70s} {seconds * 1e3:10.1f} ms" if isinstance(seconds, float) else f"  {piece}: {seconds}")
    return result


WORKERS = {"init": worker_init, "breakdown": worker_breakdown, "jax": worker_jax, "jax_long": worker_jax_long, "hf": worker_hf}


# ---------------------------------------------------------------------------------------------
# The parent: runs the workers, then the arithmetic and the table

def run_worker(name: str, args: argparse.Namespace, workdir: Path, timeout: float) -> dict:
    out = workdir / f"{name}.json"
    command = [sys.executable, __file__, "--worker", name, "--result", str(out), "--weights-dir",
               str(args.weights_dir), "--seed", str(args.seed), "--repeats", str(args.repeats),
               "--long-repeats", str(args.long_repeats)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, BENCH_WORKER=name)
    if name == "hf":
        # On a shared machine torch's default OpenMP spin-waiting stalls for seconds at random (a 1-token
        # generate took 0.4 to 8 s); passive waiting keeps its timings stable and costs it nothing here.
        env.setdefault("OMP_WAIT_POLICY", args.hf_omp_wait_policy)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"worker {name} timed out after {timeout:.0f} s")
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode:
        log(f"worker {name} failed with exit status {proc.returncode}")
        return {"error": f"exit status {proc.returncode}"}
    result = json.loads(out.read_text())
    result["worker_seconds"] = time.perf_counter() - start
    return result


def bytes_per_decode_token(config: Any, context: float) -> dict[str, float]:
    """float32 bytes one batch-1 decode step must read: weights it uses and the KV cache at `context`."""
    d, n, k, h, e, i = (config.hidden, config.num_heads, config.num_kv_heads, config.head_dim, config.num_experts,
                        config.intermediate)
    attention = d * n * h + n * h + 2 * (d * k * h + k * h) + n * h * d + d + n
    router, norms = d * e + e, 2 * d
    one_expert = d * 2 * i + 2 * i + i * d + d
    layers = config.num_layers
    non_expert = layers * (attention + router + norms) + d + d  # + final norm + one embedding row
    experts = layers * config.experts_per_token * one_expert
    unembed = config.vocab_size * d
    kv_slots = sum(min(context, config.sliding_window) if t == "sliding_attention" else context
                   for t in config.layer_types)
    kv = kv_slots * 2 * k * h
    return {"non_expert": 4 * non_expert, "experts": 4 * experts, "unembed": 4 * unembed, "kv_cache": 4 * kv,
            "total": 4 * (non_expert + experts + unembed + kv)}


def summarize(config: Any, sizes: dict, ours: dict, hf: dict, long: dict) -> dict:
    import numpy as np

    s: dict[str, Any] = {}
    bw = ours.get("bandwidth", {}).get("gb_per_s")
    s["bandwidth_gb_s"] = bw
    s["torch_bandwidth_gb_s"] = hf.get("bandwidth", {}).get("gb_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for name, batch in (("decode_b1", 1), ("decode_b8", sizes["batch"])):
        o, t = ours.get(name, {}).get("tokens_per_s"), hf.get(name, {}).get("tokens_per_s")
        s[name] = {"ours_tok_s": o, "hf_tok_s": t, "ratio": ratio(o, t)}
        if name == "decode_b1":
            # KV bytes at the mean context of the timed steps (prompt .. prompt + n)
            context = sizes["prompt"] + sizes["decode_new"] / 2
            nbytes = bytes_per_decode_token(config, context)
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
        s["long"]["activation_bytes"] = long["activation_bytes"]
        s["long"]["compile_extra_rss"] = long["compile_extra_rss"]
        s["long"]["ru_maxrss_bytes"] = long["ru_maxrss_bytes"]
    heads = config.num_heads
    s["long_hf"] = ("not attempted: transformers' eager attention builds float32 scores [1, "
                    f"{heads}, {sizes['long']}, {sizes['long']}] per layer = "
                    f"{heads * sizes['long'] ** 2 * 4 / GIB:.1f} GiB, and softmax a second copy, on a "
                    f"{_ram() / GIB:.0f} GiB machine")
    return s


def _ram() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


def print_table(s: dict, sizes: dict, ours: dict, hf: dict) -> None:
    def f(value: Any, fmt: str = "{:.2f}") -> str:
        return "-" if value is None else fmt.format(value)

    rows: list[tuple[str, str, str, str, str]] = []
    rows.append(("matvec bandwidth, float32 (GB/s)", f(s["bandwidth_gb_s"], "{:.1f}"),
                 f(s["torch_bandwidth_gb_s"], "{:.1f}") + " (torch)", "", "roofline"))
    d1 = s["decode_b1"]
    rows.append((f"decode b=1 ({sizes['prompt']}-token prompt, {sizes['decode_new']} new) tok/s",
                 f(d1["ours_tok_s"]), f(d1["hf_tok_s"]), f(d1["ratio"]), ""))
    if d1.get("roofline_tok_s"):
        mb = d1["bytes_per_token"]
        rows.append((f"  roofline tok/s ({mb['total'] / 1e9:.3f} GB/token)", f(d1["roofline_tok_s"]), "", "", ""))
        rows.append(("  roofline fraction", f(d1["ours_roofline_fraction"]), f(d1["hf_roofline_fraction"]), "", ""))
    d8 = s["decode_b8"]
    rows.append((f"decode b={sizes['batch']} ({sizes['batch_new']} new) tok/s total", f(d8["ours_tok_s"]),
                 f(d8["hf_tok_s"]), f(d8["ratio"]), ""))
    p = s["prefill"]
    rows.append((f"prefill {p['tokens']} tokens, tok/s", f(p["ours_tok_s"], "{:.1f}"), f(p["hf_tok_s"], "{:.1f}"),
                 f(p["ratio"]), ">= 1.5"))
    rows.append((f"prefill {p['tokens']} activation memory (MiB)",
                 f(p["ours_activation_bytes"] and p["ours_activation_bytes"] / MIB, "{:.0f}"),
                 f(p["hf_activation_bytes"] and p["hf_activation_bytes"] / MIB, "{:.0f}"),
                 f(p["activation_ratio"], "{:.3f}"), "<= 0.333"))
    rows.append(("  RSS with weights, before prefill (GiB)",
                 f(p["ours_baseline_rss"] and p["ours_baseline_rss"] / GIB),
                 f(p["hf_baseline_rss"] and p["hf_baseline_rss"] / GIB), "", ""))
    if "long" in s:
        lg = s["long"]
        rows.append((f"long: prefill {lg['prompt']} (s / tok/s)",
                     f"{lg['prefill_seconds']:.1f} / {lg['prefill_tokens_per_s']:.0f}", "not run", "", ""))
        rows.append((f"long: then decode {lg['new_tokens']} (s / tok/s)",
                     f"{lg['decode_seconds']:.1f} / {lg['decode_tokens_per_s']:.2f}", "not run", "", ""))
        rows.append(("long: total (s), compile separately (s)",
                     f"{lg['total_seconds']:.1f}, {lg['compile_seconds']:.1f}", "", "", ""))
        rows.append((f"long: peak RSS / over weights (GiB), cache {lg['cache_slots_full_layers']} slots",
                     f"{lg['peak_rss'] / GIB:.2f} / {lg['activation_bytes'] / GIB:.2f}", "", "", ""))
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'':{width}}{'gptoss-jax':>16}{'transformers':>22}{'ours/HF':>10}  target")
    for name, a, b, r, target in rows:
        print(f"{name:{width}}{a:>16}{b:>22}{r:>10}  {target}")
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
    parser.add_argument("--hf-omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY for transformers' process, unless set in the environment")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: jax, hf, long")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]

    if args.worker:
        result = WORKERS[args.worker](args, sizes)
        Path(args.result).write_text(json.dumps(result, default=float))
        return

    from gptoss_jax.config import load_config

    config = load_config(CONFIG_PATH)
    args.weights_dir = Path(args.weights_dir) / f"{config.name}-seed{args.seed}"
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    log(f"{'quick' if args.quick else 'full'} run: {sizes}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        workdir = Path(tmp)
        manifest = args.weights_dir / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("config") != config.to_hf_dict():
            log(f"writing random weights (seed {args.seed}) to {args.weights_dir}")
            init = run_worker("init", args, workdir, 900)
            if "error" in init:
                sys.exit("could not write the weights")
        ours = run_worker("jax", args, workdir, 1200) if "jax" not in skip else {}
        hf = run_worker("hf", args, workdir, 1200) if "hf" not in skip else {}
        long = run_worker("jax_long", args, workdir, 1500) if "long" not in skip else {}
        breakdown = run_worker("breakdown", args, workdir, 1200) if args.breakdown else {}
        summary = summarize(config, sizes, ours, hf, long)
        a, b = workdir / "jax.logits.npy", workdir / "hf.logits.npy"
        if a.is_file() and b.is_file():
            import numpy as np

            summary["logits_max_abs_diff"] = float(np.max(np.abs(np.load(a) - np.load(b))))
    summary["_long_raw"] = long
    total = time.perf_counter() - start
    if ours or hf or long:
        print_table(summary, sizes, ours, hf)
    for case, times in breakdown.items():
        if not isinstance(times, dict):
            continue
        print(f"breakdown, {case}:")
        for piece, seconds in times.items():
            print(f"    {piece:70s} " + (f"{seconds * 1e3:10.1f} ms" if isinstance(seconds, float) else str(seconds)))
    print(f"total wall time {total:.0f} s; load average now {os.getloadavg()}")
    if args.json:
        summary.pop("_long_raw")
        report = {"summary": summary, "sizes": sizes, "config": config.to_hf_dict(), "gptoss_jax": ours,
                  "transformers": hf, "long": long, "breakdown": breakdown, "wall_seconds": total, "cpus": os.cpu_count(),
                  "ram_bytes": _ram(), "quick": args.quick}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=float))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
