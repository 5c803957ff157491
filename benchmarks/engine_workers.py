"""bench_engine.py's child processes: gptoss-jax's engine (and one request at a time) and transformers'
continuous batching, each serving the same requests arriving over time. Each returns its figures."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import common
from common import GIB, log
from generate_workers import CONFIG_PATH, _load_jax_params, hf_model


def requests(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """The prompts: `--requests` rows of `--prompt` random token ids (seed 1)."""
    rng = np.random.default_rng(1)
    return rng.integers(0, vocab, (args.requests, args.prompt)).tolist()


def figures(submitted: list[float], first: list[float], finished: list[float], tokens: list[list[int]]) -> dict:
    """Aggregate tok/s (all tokens / first arrival to last finish), TTFT p50/p99 and time per output
    token (mean over requests of (finish - first token) / (tokens - 1))."""
    total = sum(len(t) for t in tokens)
    ttft = np.array(first) - np.array(submitted)
    tpot = [(f - s) / (len(t) - 1) for s, f, t in zip(first, finished, tokens) if len(t) > 1]
    span = max(finished) - min(submitted)
    return {"tokens": total, "seconds": span, "tok_s": total / span, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "tpot_s": float(np.mean(tpot)), "outputs": tokens}


def _arrivals(args: argparse.Namespace, start: float, submit: Any) -> None:
    """Calls submit(i) for each request at start + i * gap."""
    for i in range(args.requests):
        time.sleep(max(0.0, start + i * args.gap - time.perf_counter()))
        submit(i)


def worker_jax(args: argparse.Namespace) -> dict:
    import jax

    from gptoss_jax import generate
    from gptoss_jax.engine import Engine, RequestSettings

    counter = common.count_compiles()
    config, params, load_s = _load_jax_params(args)
    prompts = requests(args, config.vocab_size)
    settings = RequestSettings(max_tokens=args.new, stop_tokens=())
    engine = Engine(config, params, slots=args.slots, max_context=args.max_context, prefill_chunk=args.prompt,
                    steps_per_dispatch=args.steps_per_dispatch, prefill_rows=args.prefill_rows)
    start = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - start
    log(f"engine warm in {warmup_s:.1f} s ({engine.stats()['compilations']} programs), RSS {common.rss() / GIB:.2f} GiB")
    counter.phase = "timed"
    n = args.requests
    submitted, first, finished = [0.0] * n, [0.0] * n, [0.0] * n
    handles: list[Any] = [None] * n

    def watch(i: int) -> None:
        for _ in handles[i].stream():
            if not first[i]:
                first[i] = time.perf_counter()
        finished[i] = time.perf_counter()

    threads = []

    def submit(i: int) -> None:
        submitted[i] = time.perf_counter()
        handles[i] = engine.submit(prompts[i], settings)
        threads.append(threading.Thread(target=watch, args=(i,)))
        threads[-1].start()

    engine.start()
    _arrivals(args, time.perf_counter(), submit)
    for thread in threads:
        thread.join()
    engine.stop()
    result = {"engine": figures(submitted, first, finished, [h.generated for h in handles]),
              "engine_stats": {k: v for k, v in engine.stats().items() if k != "time"}}
    log(f"engine: {result['engine']['tok_s']:.1f} tok/s")

    # one request at a time: `generate` per request (the engine alone would still run all its slots
    # through the model: an inactive slot's token costs as much as a real one)
    counter.phase = "generate warm-up"
    generate(config, params, [prompts[0]], max_new_tokens=args.new, stop_tokens=[])
    counter.phase = "timed"
    start, outputs = time.perf_counter(), []
    for i in range(n):
        outputs += generate(config, params, [prompts[i]], max_new_tokens=args.new, stop_tokens=[])
    seconds = time.perf_counter() - start
    result["generate_sequential"] = {"tokens": sum(map(len, outputs)), "seconds": seconds,
                                     "tok_s": sum(map(len, outputs)) / seconds}
    result["generate_same_tokens"] = outputs == result["engine"]["outputs"]
    result.update(load_seconds=load_s, warmup_seconds=warmup_s, compiles=counter.counts,
                  compiled_when_timed=counter.names.get("timed", []), jax=jax.__version__)
    log(f"one at a time (generate): {result['generate_sequential']['tok_s']:.1f} tok/s")
    return result


def worker_hf(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from transformers import GenerationConfig

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    model, loaded = hf_model(CONFIG_PATH, Path(args.weights_dir))
    prompts = requests(args, model.config.vocab_size)
    config = GenerationConfig(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
    n = args.requests
    submitted, first, finished = [0.0] * n, [0.0] * n, [0.0] * n
    with torch.no_grad():
        manager = model.init_continuous_batching(generation_config=config)
        start = time.perf_counter()
        manager.warmup()
        warmup_s = time.perf_counter() - start
        manager.start()
        try:
            # warm up the loop itself on one request (not timed)
            manager.add_request(prompts[0], request_id="warm", max_new_tokens=2)
            manager.get_result("warm", timeout=600)
            ids = [f"r{i}" for i in range(n)]

            def submit(i: int) -> None:
                submitted[i] = time.perf_counter()
                manager.add_request(prompts[i], request_id=ids[i], max_new_tokens=args.new, record_timestamps=True)

            _arrivals(args, time.perf_counter(), submit)
            outputs: dict[str, Any] = {}
            deadline = time.perf_counter() + 3600
            while len(outputs) < n and time.perf_counter() < deadline:
                out = manager.get_result(timeout=1)
                if out is not None and out.request_id in ids and out.is_finished():
                    outputs[out.request_id] = out
        finally:
            manager.stop(block=True)
    tokens = [list(outputs[i].generated_tokens) for i in ids]
    for k, i in enumerate(ids):
        stamps = outputs[i].timestamps or [outputs[i].lifespan[1]]
        first[k], finished[k] = stamps[0], stamps[-1]
    result = {"continuous_batching": figures(submitted, first, finished, tokens), "warmup_seconds": warmup_s,
              "transformers": transformers.__version__, "torch": torch.__version__, **loaded}
    log(f"transformers continuous batching: {result['continuous_batching']['tok_s']:.1f} tok/s")
    return result


WORKERS = {"jax": worker_jax, "hf": worker_hf}
