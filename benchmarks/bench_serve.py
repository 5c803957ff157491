"""`gptoss-jax serve` against `transformers serve --continuous-batching`, driven over HTTP side by side.

    python benchmarks/bench_serve.py [--quick] [--json out.json]

Both servers load the same Hugging Face directory (written once under --weights-dir by
serve_workers.py: `configs/bench.json`, the random weights `init_params(config, seed)` in bfloat16,
an o200k_harmony tokenizer.json and a chat template that renders a chat exactly as our server does),
both compute in bfloat16 (ours: a Hugging Face source loads as bfloat16; transformers: `--dtype
bfloat16`), both decode greedily (temperature 0). Each is started as a subprocess on 127.0.0.1, waited
for (`GET /health` 200: for ours, after the engine has compiled its shapes; transformers preloads the
model before it listens), sent one untimed warm-up request (transformers builds its continuous-
batching manager on the first request), then driven, then stopped (SIGTERM, then SIGKILL).

- ours: `gptoss-jax serve DIR --slots 16 --max-context C` with C = prompt + output tokens rounded up
  to 64, the other flags at their defaults;
- theirs: `transformers serve DIR --continuous-batching --device cpu --dtype bfloat16 --cb-num-blocks B`,
  B = slots x ceil(C / 256) pages of 256 tokens (the same room as ours: left to itself, on CPU it takes
  60% of the machine's free RAM for its cache, 13.5 GiB here), the other --cb-* flags and attention at
  their defaults, OMP_WAIT_POLICY=PASSIVE (as the other benchmarks).

The load: at each concurrency (1, 4, 16), that many clients of the official `openai` client
(`AsyncOpenAI`, streamed chat completions, no retries) send requests back to back until
`--rounds` x concurrency requests (at least `--min-requests`) are done; every request is one user
message of `--prompt` random lowercase words, each exactly one o200k token (the same messages on both
sides; the prompt is that plus the harmony system message), `max_tokens` = `--new`. Figures, per
concurrency: aggregate output tok/s (the completion tokens usage reports, summed / the level's wall
time), time to first token p50/p99 (request sent to the first chunk carrying text, client-side),
time per output token p50 ((last chunk - first text chunk) / (tokens - 1) per request); the ratios
ours/theirs; request latency p50 (sent to last chunk); for ours also the engine's own mean TTFT and
TPOT over the level (from GET /metrics before and after it: token handed over by the engine, before
the harmony parser, which on random weights holds up to 48 tokens before it streams them as plain
content); and how many requests came back shorter than `--new` (a stop token: the tokens counted
are the tokens returned). The bars (issue 15): at 16 concurrent clients ours >= 1.5x transformers'
aggregate tok/s, and our TTFT p99 at 16 clients <= transformers'.

`--quick` runs a small config (2 layers, hidden 256, 8 experts) with 32-word prompts and 16 new
tokens (a check of the script, about 2-3 minutes once its weights exist). `--json` writes every
figure. If transformers' server cannot start or serve, its column says why (no figures are made up).
The full run took 26 minutes on the shared 2-core machine (load average about 9), most of it ours at 1
and 4 clients; --concurrency 16 --skip ... narrow it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import GIB, fmt, log, ratio
from generate_workers import CONFIG_PATH

QUICK_CONFIG = {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 64, "num_local_experts": 8, "num_experts_per_tok": 2, "experts_per_token": 2,
                "intermediate_size": 256,
                "layer_types": ["sliding_attention", "full_attention"]}
CB_PAGE = 256  # transformers' ContinuousBatchingConfig.page_size default: --cb-num-blocks counts these
SIZES = {"full": dict(prompt=128, new=64, rounds=2, min_requests=4),
         "quick": dict(prompt=32, new=16, rounds=1, min_requests=2)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_file(args: argparse.Namespace) -> Path:
    """configs/bench.json, or (--quick) a small config derived from it, written under --weights-dir."""
    if not args.quick:
        return CONFIG_PATH
    raw = {**json.loads(CONFIG_PATH.read_text()), **QUICK_CONFIG}
    path = args.weights_dir / "serve-quick.json"
    args.weights_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or json.loads(path.read_text()) != raw:
        path.write_text(json.dumps(raw, indent=1))
    return path


def ensure_hf_dir(args: argparse.Namespace, config_path: Path) -> Path:
    """The Hugging Face directory of `config_path`'s random weights (seed --seed), made once."""
    from gptoss_jax.config import load_config

    config = load_config(config_path)
    name = "bench" if not args.quick else "serve-quick"
    hf_dir = args.weights_dir / f"{name}-seed{args.seed}-hf"
    written = hf_dir / "config.json"
    want = {**json.loads(config_path.read_text()), "torch_dtype": "bfloat16"}
    if written.is_file() and json.loads(written.read_text()) == want and (hf_dir / "tokenizer.json").is_file():
        return hf_dir
    log(f"writing {hf_dir} (bfloat16 weights, tokenizer)")
    argv = ["--worker", "init", "--config", str(config_path), "--hf-dir", str(hf_dir), "--seed", str(args.seed)]
    npy = args.weights_dir / f"{config.name}-seed{args.seed}"
    if not args.quick and npy.is_dir():
        argv += ["--npy-dir", str(npy)]
    out = common.run_worker(__file__, argv, "init", timeout=1800)
    if "error" in out:
        sys.exit(f"could not write {hf_dir}: {out['error']}")
    return hf_dir


class Server:
    """A server subprocess in its own process group, its output in a log file; `stop` ends that group."""

    def __init__(self, name: str, command: list[str], port: int, logdir: Path, env: dict[str, str]):
        self.name, self.command, self.port = name, command, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        log(f"{name}: {' '.join(command)}")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=str(common.REPO))

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /health answers 200; raises with the log's tail if it exits or times out."""
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready (GET /health) after {timeout:.0f} s: {self.tail()}")

    def tail(self, chars: int = 1500) -> str:
        self._log.flush()
        return " | ".join(self.log_path.read_text(errors="replace")[-chars:].splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        self._log.close()


def max_context(prefix_tokens: int, prompt: int, new: int) -> int:
    return -(-(prefix_tokens + prompt + new) // 64) * 64


def run_side(name: str, args: argparse.Namespace, sizes: dict, hf_dir: Path, contents: dict[int, list[str]],
             context: int, logdir: Path) -> dict[str, Any]:
    """Starts one server, warms it up, drives every concurrency level, stops it; its figures or an error."""
    from serve_workers import drive, metrics_means, scrape_metrics

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if name == "gptoss_jax":
        exe = shutil.which("gptoss-jax")
        command = ([exe] if exe else [sys.executable, "-c", "import sys; from gptoss_jax.cli import main; "
                                      "sys.exit(main())"]) + [
            "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(port), "--slots", str(args.slots),
            "--max-context", str(context), "--model-name", "bench"]
        model = "bench"
    else:
        exe = shutil.which("transformers")
        if exe is None:
            return {"error": "the `transformers` command is not on PATH"}
        blocks = args.slots * -(-context // CB_PAGE)  # room for --slots requests of `context` tokens, as ours
        command = [exe, "serve", str(hf_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
                   "--device", "cpu", "--dtype", "bfloat16", "--cb-num-blocks", str(blocks), "--log-level", "warning"]
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        model = str(hf_dir)
    extra = {"stream_options": {"include_usage": True}} if name == "gptoss_jax" else {}
    result: dict[str, Any] = {"command": command, "levels": {}}
    server = Server(name, command, port, logdir, env)
    try:
        result["ready_seconds"] = server.wait_ready(args.startup_timeout)
        log(f"{name}: ready after {result['ready_seconds']:.0f} s; warm-up request")
        warm_prompt = contents[min(contents)][0]
        warm = asyncio.run(drive(server.base + "/v1", model, [warm_prompt], 1, sizes["new"], extra,
                                 args.request_timeout))
        if warm["errors"] or not warm["requests"]:
            raise RuntimeError(f"warm-up request failed: {warm['errors']}; log: {server.tail()}")
        result["warmup"] = warm
        with common.PeakRSS(interval=0.5, pid=server.proc.pid, children=True) as peak:
            for c, messages in contents.items():
                log(f"{name}: concurrency {c}, {len(messages)} requests")
                before = scrape_metrics(server.base) if name == "gptoss_jax" else None
                level = asyncio.run(drive(server.base + "/v1", model, messages, c, sizes["new"], extra,
                                          args.request_timeout))
                if before is not None:
                    level.update(metrics_means(before, scrape_metrics(server.base)))
                level["loadavg"] = os.getloadavg()
                result["levels"][c] = level
                log(f"  {fmt(level['tok_s'], '{:.1f}')} tok/s, TTFT p50 {fmt(level['ttft_p50_s'])} s p99 "
                    f"{fmt(level['ttft_p99_s'])} s, TPOT p50 {fmt(level['tpot_p50_s'] and level['tpot_p50_s'] * 1e3, '{:.0f}')} ms, "
                    f"{level['short']} short, {len(level['errors'])} errors")
                if level["errors"]:
                    log(f"  first error: {level['errors'][0]}; log: {server.tail(600)}")
        result["server_peak_rss"] = peak.peak
    except Exception as err:  # noqa: BLE001 (reported in the table, not faked)
        result["error"] = f"{type(err).__name__}: {err}"[:3000]
        log(f"{name}: {result['error']}")
    finally:
        result["log_tail"] = server.tail(3000)
        server.stop()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small config and counts (a check of the script)")
    parser.add_argument("--prompt", type=int, help="words (= tokens) of each user message")
    parser.add_argument("--new", type=int, help="max_tokens of each request")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, help="requests per client at each concurrency")
    parser.add_argument("--min-requests", type=int, help="requests at least, at each concurrency")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()) / "gptoss_bench_weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated sides to skip: jax, hf")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--npy-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from serve_workers import WORKERS

        common.write_result(args.result, WORKERS[args.worker](args))
        return

    from serve_workers import harmony_template, prompts, word_tokens

    from gptoss_jax.tokenizer import get_encoding

    sizes = dict(SIZES["quick" if args.quick else "full"])
    for key in ("prompt", "new", "rounds", "min_requests"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    levels = [int(c) for c in args.concurrency.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    log(f"concurrency {levels}: {sizes['prompt']}-word prompts, max_tokens {sizes['new']}, "
        f"{sizes['rounds']} request(s) per client (at least {sizes['min_requests']}); load average {os.getloadavg()}")
    hf_dir = ensure_hf_dir(args, config_file(args))
    before, after = harmony_template()
    encoding = get_encoding()
    prefix_tokens = len(encoding.encode(before + after, allowed_special="all"))
    context = max_context(prefix_tokens, sizes["prompt"], sizes["new"])
    words = word_tokens()
    contents = {c: prompts(words, max(sizes["min_requests"], sizes["rounds"] * c), sizes["prompt"], 1000 + c)
                for c in levels}
    expected_prompt = prefix_tokens + sizes["prompt"]
    assert all(len(encoding.encode(before + m + after, allowed_special="all")) == expected_prompt
               for m in contents[levels[0]])
    log(f"prompt {expected_prompt} tokens ({prefix_tokens} of harmony around {sizes['prompt']} words), "
        f"max context {context}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        for name, key in (("gptoss_jax", "jax"), ("transformers", "hf")):
            if key not in skip:
                results[name] = run_side(name, args, sizes, hf_dir, contents, context, Path(tmp))
    report(results, levels, sizes, expected_prompt, context, args)
    log(f"total wall time {time.perf_counter() - start:.0f} s; load average now {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "sizes": sizes, "prompt_tokens": expected_prompt,
                                         "max_context": context, "dtype": "bfloat16", "hf_dir": str(hf_dir),
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1, default=float))


def report(results: dict[str, Any], levels: list[int], sizes: dict, prompt_tokens: int, context: int,
           args: argparse.Namespace) -> None:
    ours, theirs = results.get("gptoss_jax", {}), results.get("transformers", {})
    print(f"\nbfloat16 both sides, greedy; prompt {prompt_tokens} tokens, max_tokens {sizes['new']}; ours: "
          f"--slots {args.slots} --max-context {context}; theirs: --continuous-batching "
          f"--cb-num-blocks {args.slots * -(-context // CB_PAGE)} (pages of {CB_PAGE})")
    for side, label in ((ours, "gptoss-jax serve"), (theirs, "transformers serve")):
        if side.get("error"):
            print(f"{label}: NOT MEASURED: {side['error'][:1500]}")
    rows = [("aggregate tok/s", "tok_s", 1, "{:.1f}"), ("TTFT p50 (s)", "ttft_p50_s", 1, "{:.2f}"),
            ("TTFT p99 (s)", "ttft_p99_s", 1, "{:.2f}"), ("TPOT p50 (ms)", "tpot_p50_s", 1e3, "{:.0f}"),
            ("request latency p50 (s)", "latency_p50_s", 1, "{:.2f}"),
            ("server TTFT mean (s)", "server_ttft_mean_s", 1, "{:.2f}"),
            ("server TPOT mean (ms)", "server_tpot_mean_s", 1e3, "{:.0f}")]
    table = []
    for c in levels:
        a, b = ours.get("levels", {}).get(c, {}), theirs.get("levels", {}).get(c, {})
        for label, key, scale, spec in rows:
            x, y = a.get(key), b.get(key)
            table.append([f"c={c:<3d} {label}", fmt(x and x * scale, spec), fmt(y and y * scale, spec),
                          fmt(ratio(x, y))])
        table.append([f"c={c:<3d} requests (short, errors)",
                      f"{a.get('requests', '-')} ({a.get('short', '-')}, {len(a.get('errors', []))})",
                      f"{b.get('requests', '-')} ({b.get('short', '-')}, {len(b.get('errors', []))})", ""])
    print()
    common.print_table(table, [22, 22, 12], header=["", "gptoss-jax serve", "transformers serve", "ours/theirs"])
    print("TTFT: request sent to the first chunk with text, client-side; TPOT: (last chunk - that chunk) / "
          "(tokens - 1); server TTFT/TPOT (ours only): the engine's, from /metrics, before the harmony parser. "
          "On random weights our parser holds the first tokens until MAX_HEADER_TOKENS (48) show they are no "
          "harmony header, so our client-side TTFT includes ~48 decode steps and our TPOT looks small.")
    top = max(levels)
    a, b = ours.get("levels", {}).get(top, {}), theirs.get("levels", {}).get(top, {})
    speed = ratio(a.get("tok_s"), b.get("tok_s"))
    ttft_a, ttft_b = a.get("ttft_p99_s"), b.get("ttft_p99_s")
    complete = not a.get("errors") and not b.get("errors") and a.get("requests") and b.get("requests")
    print(f"\nbar 1: at {top} clients, aggregate tok/s ours/theirs {fmt(speed)}x (>= 1.5x): "
          f"{'PASS' if complete and speed is not None and speed >= 1.5 else 'FAIL' if complete else 'NOT MEASURED'}")
    print(f"bar 2: at {top} clients, TTFT p99 ours {fmt(ttft_a)} s vs theirs {fmt(ttft_b)} s (no worse): "
          f"{'PASS' if complete and ttft_a <= ttft_b else 'FAIL' if complete else 'NOT MEASURED'}")
    for side, label in ((ours, "gptoss-jax"), (theirs, "transformers")):
        if side.get("levels"):
            prompt_seen = sorted({p for lv in side["levels"].values() for p in lv["prompt_tokens"]})
            print(f"{label}: ready after {fmt(side.get('ready_seconds'), '{:.0f}')} s; usage prompt_tokens "
                  f"{prompt_seen}; server peak RSS {fmt(side.get('server_peak_rss') and side['server_peak_rss'] / GIB)} GiB; "
                  f"finish reasons {sorted({f for lv in side['levels'].values() for f in lv['finish_reasons']})}")


if __name__ == "__main__":
    main()
