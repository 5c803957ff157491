"""bench_serve.py's helpers: the Hugging Face directory both servers load (written once by a child
process), the prompts, and the load generator that drives a server through the official `openai` client.

The directory holds what `gptoss-jax serve DIR` and `transformers serve DIR` both read: `config.json`
(the bench config), `model.safetensors` (the random weights in bfloat16: `init_params(config, seed)` in
Hugging Face layout, taken from bench_generate.py's cached .npy files when they are of the same config),
and a tokenizer transformers can load (`tokenizer.json`, o200k_harmony converted by transformers'
`TikTokenConverter`; `tokenizer_config.json` with a chat template that renders a one-user-message chat
exactly as our server's harmony renderer does, so both sides see the same prompt tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import common
from common import log

MARKER = "\u2402BENCH_USER_CONTENT\u2402"  # where the user's text goes in the rendered chat


def harmony_template() -> tuple[str, str]:
    """(text before, text after) the user's content in our server's prompt for a one-user-message chat."""
    from gptoss_jax.serve.chat import ChatRequest, prepare
    from gptoss_jax.tokenizer import get_encoding

    encoding = get_encoding()
    prompt = prepare(ChatRequest(messages=[{"role": "user", "content": MARKER}]), encoding, 1 << 20).prompt
    text = encoding.decode(prompt)
    before, after = text.split(MARKER)
    return before, after


def chat_template(before: str, after: str) -> str:
    """A Jinja chat template: the rendered harmony prefix, the last user message's content, the suffix
    (`<|start|>assistant`), whatever `add_generation_prompt` says (a benchmark only sends one message)."""
    def literal(s: str) -> str:
        return json.dumps(s)  # a JSON string is a valid Jinja string literal

    return ("{{ " + literal(before) + " }}{{ messages[-1]['content'] }}{{ " + literal(after) + " }}")


def write_tokenizer(out: Path, before: str, after: str) -> None:
    """tokenizer.json (o200k_harmony through TikTokenConverter) and tokenizer_config.json."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptoss_jax.tokenizer import get_encoding

    encoding = get_encoding()
    ranks_file = out / "o200k_base.tiktoken"
    with open(ranks_file, "wb") as f:
        for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    tokenizer = TikTokenConverter(vocab_file=str(ranks_file), pattern=encoding._pat_str,
                                  extra_special_tokens=encoding._special_tokens).converted()
    tokenizer.save(str(out / "tokenizer.json"))
    ranks_file.unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>", "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(before, after)}, indent=1))


def _hf_tensors(config: Any, config_path: Path, seed: int, npy_dir: Path | None) -> dict[str, Any]:
    """name -> float32 array of `init_params(config, seed)` in Hugging Face layout: the cached .npy
    files of bench_generate.py when they hold this config, else made here."""
    import numpy as np

    if npy_dir is not None and (npy_dir / "manifest.json").is_file():
        manifest = json.loads((npy_dir / "manifest.json").read_text())
        if manifest.get("config") == config.to_hf_dict() and manifest.get("seed") == seed:
            log(f"weights from {npy_dir}")
            return {name: np.load(npy_dir / f"{name}.npy", mmap_mode="r") for name in manifest["names"]}
    import jax
    import jax.numpy as jnp

    from gptoss_jax.params import init_params, params_to_hf

    log(f"init_params({config_path.name}, seed {seed}, float32)")
    params = init_params(config, seed, jnp.float32)
    jax.block_until_ready(params)
    return {name: np.asarray(array, np.float32) for name, array in params_to_hf(config, params)}


def worker_init(args: argparse.Namespace) -> dict:
    """Writes the Hugging Face directory `--hf-dir` for `--config` (bfloat16 weights, tokenizer)."""
    import ml_dtypes
    import numpy as np

    from gptoss_jax.checkpoint.safetensors_io import save_safetensors
    from gptoss_jax.config import load_config

    start = time.perf_counter()
    config_path = Path(args.config)
    config = load_config(config_path)
    out = Path(args.hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(config, config_path, args.seed, Path(args.npy_dir) if args.npy_dir else None)
    bf16 = {name: np.asarray(array).astype(ml_dtypes.bfloat16) for name, array in tensors.items()}
    del tensors
    save_safetensors(out / "model.safetensors", bf16)
    del bf16
    hf_config = json.loads(config_path.read_text())
    hf_config["torch_dtype"] = "bfloat16"
    before, after = harmony_template()
    log("tokenizer: o200k_harmony -> tokenizer.json")
    write_tokenizer(out, before, after)
    (out / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [200002, 200012, 199999], "pad_token_id": 199999, "do_sample": False}))
    (out / "config.json").write_text(json.dumps(hf_config, indent=1))  # last: its presence marks a whole directory
    return {"seconds": time.perf_counter() - start, "config": hf_config}


WORKERS = {"init": worker_init}


# ---------------------------------------------------------------------------------------------
# Prompts and load

def word_tokens(limit: int = 4000) -> list[str]:
    """Ordinary o200k tokens that are a space and lowercase letters and encode back to themselves:
    any sequence of them tokenizes to exactly one token each (a fixed prompt length in tokens)."""
    import re

    from gptoss_jax.tokenizer import get_encoding

    encoding = get_encoding()
    words = []
    for token in range(1000, 199998):
        try:
            text = encoding.decode_single_token_bytes(token).decode("utf-8")
        except (UnicodeDecodeError, KeyError):
            continue
        if re.fullmatch(r" [a-z]{3,12}", text) and encoding.encode_ordinary(text) == [token]:
            words.append(text)
            if len(words) >= limit:
                break
    return words


def prompts(words: list[str], count: int, length: int, seed: int) -> list[str]:
    """`count` user messages of `length` random words (tokens) each (each word with its leading space:
    without it the first word need not be one token)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return ["".join(words[i] for i in rng.integers(0, len(words), length)) for _ in range(count)]


async def one_request(client: Any, model: str, content: str, max_tokens: int, extra: dict, timeout: float
                      ) -> dict[str, Any]:
    """One streamed chat completion: send time, first-token time (first chunk with text), finish time,
    chunks with text, usage (the last chunk's) and finish_reason."""
    sent = time.perf_counter()
    first = None
    text_chunks, usage, finish, text = 0, None, None, []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0,
        stream=True, timeout=timeout, **extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            piece = (delta.content or "") + (getattr(delta, "reasoning", None) or "") + \
                (getattr(delta, "reasoning_content", None) or "") if delta is not None else ""
            if piece or (delta is not None and delta.tool_calls):
                text_chunks += 1
                text.append(piece)
                if first is None:
                    first = time.perf_counter()
            if choice.finish_reason:
                finish = choice.finish_reason
    done = time.perf_counter()
    return {"sent": sent, "first": first or done, "done": done, "text_chunks": text_chunks,
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None, "finish_reason": finish,
            "chars": sum(map(len, text))}


def scrape_metrics(base_url: str) -> dict[str, float]:
    """Our server's Prometheus histograms' _sum and _count (time to first token, time per output token)
    as the engine hands tokens over (server-side, before the harmony parser), from GET /metrics."""
    import httpx

    out = {}
    for line in httpx.get(base_url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(("gptoss_time_to_first_token_seconds_", "gptoss_time_per_output_token_seconds_")) and \
                name.endswith(("_sum", "_count")):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def metrics_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean server-side TTFT and TPOT over the requests between two scrapes."""
    def mean(stem: str) -> float | None:
        count = after.get(stem + "_count", 0.0) - before.get(stem + "_count", 0.0)
        return (after.get(stem + "_sum", 0.0) - before.get(stem + "_sum", 0.0)) / count if count else None

    return {"server_ttft_mean_s": mean("gptoss_time_to_first_token_seconds"),
            "server_tpot_mean_s": mean("gptoss_time_per_output_token_seconds")}


async def drive(base_url: str, model: str, contents: list[str], concurrency: int, max_tokens: int, extra: dict,
                timeout: float) -> dict[str, Any]:
    """`concurrency` clients, each sending its share of `contents` one after another (closed loop)."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0,
                           http_client=httpx.AsyncClient(limits=limits, timeout=timeout)) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for content in contents:
            queue.put_nowait(content)
        results: list[dict] = []
        errors: list[str] = []

        async def worker() -> None:
            while not queue.empty():
                content = queue.get_nowait()
                try:
                    results.append(await one_request(client, model, content, max_tokens, extra, timeout))
                except Exception as err:  # noqa: BLE001 (counted and reported)
                    errors.append(f"{type(err).__name__}: {err}"[:300])

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout * len(contents))
        return figures(results, start, time.perf_counter(), max_tokens, errors)


def figures(results: list[dict], start: float, end: float, max_tokens: int, errors: list[str]) -> dict[str, Any]:
    """Aggregate output tok/s (usage's completion tokens / wall time of the level), TTFT p50/p99, time
    per output token p50 ((done - first) / (tokens - 1) per request), and how many came back short."""
    import numpy as np

    tokens = [r["completion_tokens"] or 0 for r in results]
    ttft = [r["first"] - r["sent"] for r in results]
    tpot = [(r["done"] - r["first"]) / (n - 1) for r, n in zip(results, tokens) if n > 1]
    latency = [r["done"] - r["sent"] for r in results]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"requests": len(results), "errors": errors, "tokens": sum(tokens), "seconds": end - start,
            "tok_s": sum(tokens) / (end - start) if results else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
            "latency_p50_s": pct(latency, 50),
            "short": sum(n < max_tokens for n in tokens), "missing_usage": sum(r["completion_tokens"] is None
                                                                                for r in results),
            "prompt_tokens": sorted({r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None}),
            "finish_reasons": sorted({str(r["finish_reason"]) for r in results}),
            "text_chunks_mean": float(np.mean([r["text_chunks"] for r in results])) if results else None}
