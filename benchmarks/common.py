"""What the benchmarks share: logging, memory (RSS) and time measurement, the bandwidth roofline,
bytes per decode token from the model's declarations, child-process workers and tables.

Every figure derived from the model (bytes per token, parameter counts) comes from
`gptoss_jax.params.abstract_params` / `logical_axes` and `gptoss_jax.cache.abstract_cache`, so a
config or a new weight format changes the figures with the model instead of silently breaking them.
The benchmarks import this as `common` (their own folder is first on `sys.path` when run as scripts).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB, GIB = 1 << 20, 1 << 30


def log(msg: str, stream: Any = None) -> None:
    """Prints `msg` with the time and the worker's name (BENCH_WORKER, else "main"), flushed."""
    print(f"[{time.strftime('%H:%M:%S')} {os.environ.get('BENCH_WORKER', 'main')}] {msg}", file=stream or sys.stdout,
          flush=True)


def ram_bytes() -> int:
    """This machine's physical memory (MemTotal)."""
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024


# ---------------------------------------------------------------------------------------------
# Memory

def rss(pid: int | None = None, children: bool = False) -> int:
    """Resident bytes of process `pid` (default: this one), plus its descendants' with `children`."""
    import psutil

    process = psutil.Process(pid)
    total = process.memory_info().rss
    if children:
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
    return total


def max_rss(who: str = "self") -> int:
    """`getrusage` peak RSS in bytes of this process ("self") or of its waited-for children ("children")."""
    which = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    return resource.getrusage(which).ru_maxrss * 1024


def _proc_status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def high_water_rss() -> int:
    """The kernel's peak RSS of this process (VmHWM) since the last `reset_high_water_rss`, in bytes."""
    kib = _proc_status_kib("VmHWM")
    return kib * 1024 if kib is not None else max_rss()


def reset_high_water_rss() -> int:
    """Resets VmHWM to the current RSS (Linux clear_refs 5), so that one-off costs before a measured
    part (compilation, construction) are not counted; returns the current RSS (VmRSS) in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else rss()


def trim() -> None:
    """Frees what Python and glibc hold but do not use, so that the RSS is the memory in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples the RSS of `pid` (default: this process; with `children`, its descendants too) every
    `interval` seconds in a thread while the block runs; `.start` and `.peak` after it."""

    def __init__(self, interval: float = 0.005, pid: int | None = None, children: bool = False):
        self.interval, self.pid, self.children = interval, pid, children

    def _read(self) -> int:
        try:
            return rss(self.pid, self.children)
        except Exception:  # the process ended between two samples
            return 0

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


# ---------------------------------------------------------------------------------------------
# Time

def run_times(fn: Callable[..., Any], *args: Any, repeats: int, warmup: int = 1,
              fresh: Callable[[], tuple] | None = None) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of `fn(*args)` (blocked on its result) after `warmup`
    untimed ones; `fresh()` makes new arguments for each call (donated buffers). Returns the times
    and the last output."""
    import jax

    times, out = [], None
    for i in range(warmup + repeats):
        call_args = fresh() if fresh else args
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*call_args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, out


def median(values: Sequence[float]) -> float:
    """The upper median (the middle of an odd count; of an even one, the larger middle value)."""
    return sorted(values)[len(values) // 2]


def measured_runs(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Runs `fn` `repeats` times, each after a `trim`; per run: seconds, RSS before, peak RSS during."""
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


class CompileCounter(logging.Handler):
    """Counts `jax_log_compiles` messages per `phase` (and passes other warnings on to stderr)."""

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


def count_compiles() -> CompileCounter:
    """Turns on `jax_log_compiles` and routes jax's log to a new `CompileCounter`."""
    import jax

    jax.config.update("jax_log_compiles", True)
    counter = CompileCounter()
    jax_logger = logging.getLogger("jax")
    jax_logger.handlers = [counter]
    jax_logger.setLevel(logging.DEBUG)
    jax_logger.propagate = False
    return counter


# ---------------------------------------------------------------------------------------------
# Bandwidth roofline and bytes per token

def _bandwidth(nbytes: int, times: list[float]) -> dict[str, float]:
    return {"bytes": nbytes, "best_seconds": min(times), "median_seconds": median(times),
            "gb_per_s": nbytes / min(times) / 1e9, "median_gb_per_s": nbytes / median(times) / 1e9}


def matvec_bandwidth(shape: Sequence[int], repeats: int = 20) -> dict[str, float]:
    """Memory bandwidth (GB/s) from the best of `repeats` jitted float32 matvecs of a `shape` matrix."""
    import jax
    import jax.numpy as jnp

    matrix = jax.random.normal(jax.random.key(0), tuple(shape), jnp.float32)
    vector = jnp.ones((shape[1],), jnp.float32)
    times, _ = run_times(jax.jit(lambda a, x: a @ x), matrix, vector, repeats=repeats)
    return _bandwidth(matrix.size * 4, times)


def matvec_bandwidth_torch(shape: Sequence[int], repeats: int = 20) -> dict[str, float]:
    """The same with `torch.mv` (no warm-up call), for reference."""
    import torch

    matrix, vector = torch.randn(*shape), torch.ones(shape[1])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        times.append(time.perf_counter() - start)
    return _bandwidth(matrix.numel() * 4, times)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(name, str) for name in x)


def declared_bytes(axes: Any, shapes: Any) -> list[tuple[tuple, tuple[str, ...], tuple[int, ...], int]]:
    """(path, logical axes, shape, bytes) per declared weight: `axes` is a tree of axis-name tuples
    and `shapes` the matching tree of `ShapeDtypeStruct`s; a weight that is itself a pytree (e.g. a
    quantized type) counts all of its leaves' bytes under its one entry, with its first leaf's shape."""
    import jax

    out = []

    def visit(path: tuple, names: tuple[str, ...], value: Any) -> None:
        leaves = jax.tree.leaves(value)
        nbytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
        out.append((path, names, tuple(leaves[0].shape), nbytes))

    jax.tree_util.tree_map_with_path(visit, axes, shapes, is_leaf=_is_axes)
    return out


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def bytes_per_token(config: Any, dtype: Any, context: float, batch: int = 1) -> dict[str, float]:
    """Bytes one decode step of `batch` rows must read, from the declared shapes: every weight but the
    experts (the embedding table: one row a row), `experts_per_token` of `num_experts` of each weight
    with an "experts" axis (dense or quantized alike), the unembedding (other "vocab" weights), and
    the K/V buffers of `abstract_cache` at `context` slots (the int32 slot positions, shared by all
    layers of a kind, are left out). Counts rows' experts as `batch` x top-k, at most all of them."""
    import jax.numpy as jnp

    from gptoss_jax import cache
    from gptoss_jax.params import LAYER_AXIS, abstract_params, logical_axes

    parts = {"non_expert": 0.0, "experts": 0.0, "unembed": 0.0, "kv_cache": 0.0}
    used = min(config.num_experts, batch * config.experts_per_token) / config.num_experts
    for path, names, shape, nbytes in declared_bytes(logical_axes(config), abstract_params(config, dtype)):
        own = tuple(n for n in names if n != LAYER_AXIS)
        if "experts" in own:
            parts["experts"] += nbytes * used
        elif "vocab" in own and tuple(map(_key, path)) == ("embed",):  # a lookup: one row a token
            parts["non_expert"] += nbytes / shape[names.index("vocab")] * batch
        elif "vocab" in own:
            parts["unembed"] += nbytes
        else:
            parts["non_expert"] += nbytes
    def kv_bytes(slots: int) -> float:
        shapes = cache.abstract_cache(config, batch, max(1, slots), jnp.dtype(dtype))
        return float(sum(nbytes for _, names, _, nbytes in declared_bytes(cache.logical_axes(), shapes)
                         if LAYER_AXIS in names))

    low = math.floor(context)  # a mean context need not be whole: linear between the whole ones around it
    parts["kv_cache"] = kv_bytes(low) + (context - low) * (kv_bytes(low + 1) - kv_bytes(low)) if context > low \
        else kv_bytes(low)
    return {**parts, "total": sum(parts.values())}


# ---------------------------------------------------------------------------------------------
# Child processes

def run_worker(script: str | Path, argv: Sequence[str], name: str, timeout: float | None = None,
               env: dict[str, str] | None = None, quiet: bool = False, result: Path | None = None
               ) -> dict[str, Any]:
    """Runs `python script *argv --result FILE` (BENCH_WORKER=`name`) and returns the JSON it wrote to
    FILE (with `worker_seconds`), or {"error": ...} when it fails or times out. FILE is `result`
    (files the worker writes beside it stay) or a temporary one; `quiet` captures the worker's output
    (the error then ends with its stderr's tail)."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        out = result or Path(tmp) / "result.json"
        command = [sys.executable, str(script), *argv, "--result", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, env=dict(env or os.environ, BENCH_WORKER=name), timeout=timeout,
                                  capture_output=quiet, text=True)
        except subprocess.TimeoutExpired:
            log(f"worker {name} timed out after {timeout:.0f} s")
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode or not out.is_file():
            log(f"worker {name} failed with exit status {proc.returncode}")
            return {"error": f"exit status {proc.returncode}" + (f"\n{proc.stderr[-4000:]}" if quiet else "")}
        data = json.loads(out.read_text())
    data["worker_seconds"] = time.perf_counter() - start
    return data


def write_result(path: str | Path | None, result: dict[str, Any]) -> None:
    """A worker's end: its result as JSON to `path` (from `run_worker`), or as a `RESULT ` stdout line."""
    text = json.dumps(result, default=float)
    if path:
        Path(path).write_text(text)
    else:
        print("RESULT " + text)


# ---------------------------------------------------------------------------------------------
# Tables

def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def fmt(value: Any, spec: str = "{:.2f}") -> str:
    """`spec.format(value)`, or "-" for None."""
    return "-" if value is None else spec.format(value)


def print_table(rows: Sequence[Sequence[str]], widths: Sequence[int], header: Sequence[str] | None = None,
                first: int | None = None) -> None:
    """Prints rows: the first cell left-aligned in `first` characters (default: the longest + 2),
    then each cell right-aligned in its width; a width of 0 puts the cell after two spaces, unaligned."""
    first = first if first is not None else max(len(r[0]) for r in rows) + 2

    def line(cells: Sequence[str]) -> str:
        rest = "".join(f"  {c}" if w == 0 else f"{c:>{w}}" for c, w in zip(cells[1:], widths))
        return f"{cells[0]:{first}}{rest}"

    if header is not None:
        print(line(header))
    for row in rows:
        print(line(row))
