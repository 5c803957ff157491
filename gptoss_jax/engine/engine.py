"""The continuous-batching engine: a host-side scheduler over the jitted slot operations of `state.py`.

Each `step` (1) applies cancellations, (2) admits waiting requests into free slots, then (3) while
any admitted request is still prefilling, runs one prefill chunk (`prefill_chunk` tokens) of each of
the `prefill_rows` earliest of them together with one decode step of every decoding slot, in one
call and one pass through the layers (`state.step`: the expert weights and the unembedding are
read once for both; a prompt's last chunk makes its first token), else (4) one decode dispatch over
every decoding slot, with the stop checks on the device; it hands each request its new tokens. So a
long prompt never stalls the running streams (each of its chunks carries their next token), and a
finished or cancelled request frees its slot for the next step. Bench config, float32: a 32-token
prompt chunk alone took 294 ms, with three slots decoding in the same call 325 ms, where a decode
step of three slots alone takes ~160 ms.

A dispatch runs several decode steps, so the host round trip is paid once for them, but an
arrival waits for the dispatch in flight before its prefill: a dispatch runs as many steps as fit
in `dispatch_seconds` at the measured step time (between 1 and `steps_per_dispatch`; one program,
the count is an argument). On an accelerator (steps of milliseconds) that is `steps_per_dispatch`;
on a CPU (bench config, 16 slots: ~0.3 s a step) one step: with idle slots skipping the experts,
bench_engine's time to first token p50 went from 6.4 s (8 steps per dispatch) to 2.2 s.

Prefix reuse, bounded by the slots themselves (no memory besides the cache): a slot that is free
keeps its cache row and the tokens it holds (prompt + generated, but the last generated token,
never fed). A new request takes the free slot whose tokens give it the longest reusable prefix,
else the least recently used free slot (evicting what it held). With m prompt tokens matching the
slot's L cached ones, the request prefills from s = min(m, prompt length - 1) (its last token is
always run: it makes the first logits) when that keeps every layer exact: the full layers hold all
positions < s; the sliding layers' ring holds only positions [L - window, L), and the tokens from
s on attend to (s - window, s), so s >= L - 1 (the prompt extends the cached sequence: the next turn
of a conversation, a tool loop) or L <= window. Otherwise nothing is reused (s = 0). The slot's
cached positions >= s are cleared (both kinds) before the prefill. `Handle.cached_tokens` and the
`cached_tokens` / `prefilled_tokens` counters say what was reused and what was run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gptoss_jax import cache as kv_cache
from gptoss_jax.config import Config
from gptoss_jax.engine import state as slot_ops
from gptoss_jax.engine.request import Handle, Refused, RequestSettings
from gptoss_jax.model import Params
from gptoss_jax.ops.bits import as_bits, value_dtype


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on the host (on several processes: this process's copy)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


class _Request:
    """A validated request waiting for, or holding, a slot."""

    def __init__(self, handle: Handle, prompt: list[int], settings: RequestSettings, seed: int):
        self.handle, self.prompt, self.settings, self.seed = handle, prompt, settings, seed


class _Slot:
    """Host bookkeeping of one slot: its request, phase, the tokens its cache row holds."""

    def __init__(self) -> None:
        self.request: _Request | None = None
        self.phase = "free"  # free | prefill | decode
        self.cached: list[int] = []  # tokens whose keys and values the row holds, positions 0..len-1
        self.next = 0  # prefill: the next prompt position to run
        self.used = 0  # when it last held a request (for least-recently-used eviction)
        self.admitted = 0


class Engine:
    """Continuous batching over `slots` rows of a `max_context`-position KV cache (see the module doc).

    `prefill_chunk` tokens of up to `prefill_rows` prompts per prefill call, with a decode step
    (compiled for 1, 4, 16, ... and `prefill_rows` rows; the smallest that fits is used), at most
    `steps_per_dispatch` decode steps per dispatch (as many as fit in `dispatch_seconds`), at most `max_queue` requests
    waiting, `max_stop_tokens` stop tokens and `max_forced_tokens` forced tokens per request. Made
    under `jax.set_mesh(mesh)` (with params on that mesh), it runs every step on that mesh, from any
    thread."""

    def __init__(self, config: Config, params: Params, *, slots: int = 8, max_context: int = 4096,
                 prefill_chunk: int = 256, steps_per_dispatch: int = 8, max_queue: int = 256,
                 prefill_rows: int = 4, max_stop_tokens: int = 16, max_forced_tokens: int = 64,
                 dispatch_seconds: float = 0.25):
        for name, value in (("slots", slots), ("max_context", max_context), ("prefill_chunk", prefill_chunk),
                            ("steps_per_dispatch", steps_per_dispatch), ("max_queue", max_queue),
                            ("prefill_rows", prefill_rows),
                            ("max_stop_tokens", max_stop_tokens), ("max_forced_tokens", max_forced_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(dispatch_seconds, (int, float)) or not dispatch_seconds > 0:
            raise ValueError(f"dispatch_seconds must be a number > 0, got {dispatch_seconds!r}")
        if max_context > config.max_positions:
            raise ValueError(f"max_context {max_context} exceeds the model's {config.max_positions} positions")
        if prefill_chunk > max_context:
            raise ValueError(f"prefill_chunk {prefill_chunk} exceeds max_context {max_context}")
        self.config, self.slots, self.max_context = config, slots, max_context
        self.prefill_chunk, self.steps_per_dispatch, self.max_queue = prefill_chunk, steps_per_dispatch, max_queue
        self.max_stop_tokens, self.max_forced_tokens = max_stop_tokens, max_forced_tokens
        self.dispatch_seconds = float(dispatch_seconds)
        self._step_seconds: float | None = None  # decode step time, a moving average (dispatch length)
        self.prefill_rows = min(prefill_rows, slots)
        # prefill calls run 1, 4, 16, ... rows (and prefill_rows): a lone prompt is not padded to many
        self._row_buckets = sorted({4 ** k for k in range(8) if 4 ** k < self.prefill_rows} | {self.prefill_rows})
        self._mesh = jax.sharding.get_mesh()  # the mesh set with jax.set_mesh (thread-local), if any
        self._params = as_bits(params)  # no copies; see `gptoss_jax.ops.bits`
        dtype = value_dtype(self._params["embed"])
        self._jit = {
            "init": jax.jit(functools.partial(slot_ops.init_state, config, slots, max_context, dtype,
                                              max_stop_tokens, max_forced_tokens)),
            "begin": jax.jit(slot_ops.begin, donate_argnums=0),
            "step": jax.jit(functools.partial(slot_ops.step, config), donate_argnums=1),
            "decode": jax.jit(functools.partial(slot_ops.decode, config, steps_per_dispatch), donate_argnums=1),
            "release": jax.jit(slot_ops.release, donate_argnums=0),
        }
        with self._in_mesh():
            # committed to its devices, as every later state (an output of a call on committed
            # inputs) is: warm-up compiled for an uncommitted one recompiled at the first request
            self._state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), self._call("init"))
        self._cache_bytes = kv_cache.used_bytes(self._state["cache"])
        self._slots = [_Slot() for _ in range(slots)]
        self._queue: deque[_Request] = deque()
        self._inbox: list[_Request] = []  # submitted since the last step
        self._cancels: list[str] = []
        self._live: dict[str, _Request] = {}  # queued or in a slot
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ready = False
        self.error: BaseException | None = None
        self._counters = dict(prompt_tokens=0, generated_tokens=0, cached_tokens=0, prefilled_tokens=0, submitted=0,
                              finished=0, cancelled=0, refused=0, steps=0, prefill_chunks=0, dispatches=0)
        self._warm_compilations: int | None = None

    # ---- device calls -------------------------------------------------------------------------------

    def _in_mesh(self) -> Any:
        return contextlib.nullcontext() if self._mesh.empty else jax.set_mesh(self._mesh)

    def _call(self, name: str, *args: Any) -> Any:
        return self._jit[name](*args)

    def compilations(self) -> int:
        """Programs compiled so far by this engine's jitted operations."""
        return sum(fn._cache_size() for fn in self._jit.values())

    def _settings_row(self, request: _Request | None) -> dict[str, np.ndarray]:
        """One slot's SETTINGS rows for `request` (None: neutral values, for warm-up)."""
        s = request.settings if request else RequestSettings(max_tokens=1, stop_tokens=())
        seed = request.seed if request else 0
        stops = np.full((self.max_stop_tokens,), -1, np.int32)
        stops[: len(s.stop_tokens)] = s.stop_tokens
        forced = np.zeros((self.max_forced_tokens,), np.int32)
        forced[: len(s.forced_tokens)] = s.forced_tokens
        allowed = np.ones((self.config.vocab_size,), bool)
        if s.allowed_tokens is not None:
            allowed[:] = False
            allowed[list(s.allowed_tokens)] = True
        return {"budget": np.int32(s.max_tokens), "temperature": np.float32(s.temperature),
                "top_k": np.int32(min(s.top_k, self.config.vocab_size)), "top_p": np.float32(s.top_p),
                "min_p": np.float32(s.min_p), "seed": np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32),
                "stops": stops, "forced": forced, "forced_len": np.int32(len(s.forced_tokens)), "allowed": allowed}

    def warmup(self) -> None:
        """Compiles every program the engine runs (each has one shape); afterwards nothing compiles."""
        with self._lock:
            if any(slot.phase != "free" for slot in self._slots):
                raise RuntimeError("warmup must run before any request is admitted")
        with self._in_mesh():
            state = self._call("begin", self._state, np.int32(0), np.int32(0), self._settings_row(None))
            for rows in self._row_buckets:
                state, first, _ = self._call("step", self._params, state, np.arange(rows, dtype=np.int32),
                                             np.zeros((rows, self.prefill_chunk), np.int32), np.zeros(rows, np.int32),
                                             np.zeros(rows, np.int32), np.zeros(rows, bool))
            state, out = self._call("decode", self._params, state, np.int32(self.steps_per_dispatch))
            state = self._call("release", state, np.int32(0))
            _host(first), _host(out), _host(state["active"])
        self._state = state
        self._slots[0].cached = []
        self._warm_compilations = self.compilations()
        self.ready = True

    # ---- requests -----------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], settings: RequestSettings, request_id: str | None = None) -> Handle:
        """Queues a request (thread-safe) and returns its handle; raises Refused, before any work, for
        an empty or out-of-vocabulary prompt, prompt + max_tokens over max_context, a full queue,
        stop/forced/allowed tokens the engine cannot hold, or a request id in use."""
        try:
            request = self._validate(prompt, settings, request_id)
        except Refused:
            with self._lock:
                self._counters["refused"] += 1
            raise
        with self._lock:
            if len(self._queue) + len(self._inbox) >= self.max_queue:
                self._counters["refused"] += 1
                raise Refused(f"the queue is full ({self.max_queue} requests waiting); retry later", reason="busy")
            if request.handle.request_id in self._live:
                self._counters["refused"] += 1
                raise Refused(f"request id {request.handle.request_id!r} is already in use", field="request_id")
            self._admit_locally(request)
        return request.handle

    def _admit_locally(self, request: _Request) -> None:
        """(lock held) Adds a validated request to the inbox (the next step queues it)."""
        self._live[request.handle.request_id] = request
        self._inbox.append(request)
        self._counters["submitted"] += 1
        self._wake.notify_all()

    def _validate(self, prompt: Sequence[int], settings: RequestSettings, request_id: str | None) -> _Request:
        if self.error is not None:
            raise Refused(f"the engine has stopped after an error: {self.error!r}", reason="stopped")
        if not isinstance(settings, RequestSettings):
            raise Refused(f"settings must be a RequestSettings, got {type(settings).__name__}")
        if isinstance(prompt, (str, bytes)):
            raise Refused("prompt must be a sequence of token ids, not a string", field="prompt")
        tokens = list(prompt)
        if not tokens:
            raise Refused("prompt is empty", field="prompt")
        vocab = self.config.vocab_size
        for i, token in enumerate(tokens):
            if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= token < vocab:
                raise Refused(f"prompt token {token!r} at index {i} is not a token id in [0, {vocab})", field="prompt")
        tokens = [int(t) for t in tokens]
        if len(tokens) + settings.max_tokens > self.max_context:
            raise Refused(f"prompt of {len(tokens)} tokens + max_tokens {settings.max_tokens} exceeds the engine's "
                          f"context of {self.max_context} positions", field="max_tokens")
        if len(settings.stop_tokens) > self.max_stop_tokens:
            raise Refused(f"stop_tokens holds {len(settings.stop_tokens)} tokens; the engine takes at most "
                          f"{self.max_stop_tokens}", field="stop_tokens")
        if len(settings.forced_tokens) > self.max_forced_tokens:
            raise Refused(f"forced_tokens holds {len(settings.forced_tokens)} tokens; the engine takes at most "
                          f"{self.max_forced_tokens}", field="forced_tokens")
        for name in ("forced_tokens", "allowed_tokens"):
            bad = [t for t in getattr(settings, name) or () if t >= vocab]
            if bad:
                raise Refused(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})", field=name)
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise Refused(f"request_id must be a non-empty string or None, got {request_id!r}", field="request_id")
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        handle = Handle(request_id if request_id is not None else f"req-{next(self._ids)}", len(tokens))
        return _Request(handle, tokens, settings, seed)

    def cancel(self, request_id: str) -> None:
        """Cancels a request (thread-safe): its slot is freed at the next step and its handle finishes
        with "cancelled". Unknown or finished ids are ignored."""
        with self._lock:
            self._cancels.append(request_id)
            self._wake.notify_all()

    # ---- scheduling ---------------------------------------------------------------------------------

    def _take_events(self) -> tuple[list[_Request], list[str]] | None:
        """(lock held) This step's new requests and cancellations, or None when there is nothing to do."""
        if not self._has_work():
            return None
        arrivals, self._inbox = self._inbox, []
        cancels, self._cancels = self._cancels, []
        return arrivals, cancels

    def _has_work(self) -> bool:
        return bool(self._inbox or self._queue or self._cancels or any(s.phase != "free" for s in self._slots))

    def step(self) -> bool:
        """One scheduling step: cancellations, admissions, a prefill chunk with a decode step or a decode dispatch.
        Returns False (having done nothing) when there is nothing to do."""
        with self._lock:
            events = self._take_events()
            if events is None:
                return False
            arrivals, cancels = events
            self._queue.extend(arrivals)
        with self._in_mesh():
            for request_id in cancels:
                self._cancel_now(request_id)
            with self._lock:
                admitted = self._admissions()
            for slot, request in admitted:
                self._begin(slot, request)
            if any(slot.phase == "prefill" for slot in self._slots):
                self._prefill_chunk()
            elif any(slot.phase == "decode" for slot in self._slots):
                steps = self._dispatch_steps()
                start = time.perf_counter()
                self._state, out = self._call("decode", self._params, self._state, np.int32(steps))
                self._counters["dispatches"] += 1
                made = self._deliver({}, out)
                self._measured(time.perf_counter() - start, made)
        self._counters["steps"] += 1
        return True

    def _dispatch_steps(self) -> int:
        """Decode steps for the next dispatch (see the module doc)."""
        if self._step_seconds is None:
            return 1
        return max(1, min(self.steps_per_dispatch, int(self.dispatch_seconds / self._step_seconds)))

    def _measured(self, seconds: float, steps: int) -> None:
        """Folds a dispatch of `steps` steps that took `seconds` into the step time's moving average."""
        if steps > 0:
            step = seconds / steps
            self._step_seconds = step if self._step_seconds is None else 0.7 * self._step_seconds + 0.3 * step

    def _cancel_now(self, request_id: str) -> None:
        with self._lock:
            request = self._live.get(request_id)
            if request is None:
                return
            if request in self._queue:
                self._queue.remove(request)
                self._finish(request, "cancelled")
                return
        slot = next(i for i, s in enumerate(self._slots) if s.request is request)
        if self._slots[slot].phase == "decode":
            self._state = self._call("release", self._state, np.int32(slot))
        self._free(slot, "cancelled")

    def _admissions(self) -> list[tuple[int, _Request]]:
        """(lock held) Waiting requests paired with free slots (the best prefix match, else the least
        recently used), in arrival order; the requests leave the queue."""
        pairs = []
        free = [i for i, s in enumerate(self._slots) if s.phase == "free"]
        while self._queue and free:
            request = self._queue.popleft()
            slot = max(free, key=lambda i: (self._reusable(self._slots[i].cached, request.prompt),
                                            -self._slots[i].used))
            free.remove(slot)
            self._slots[slot].phase = "prefill"  # reserved now; `_begin` fills it in
            pairs.append((slot, request))
        return pairs

    def _reusable(self, cached: list[int], prompt: list[int]) -> int:
        """Prompt tokens a slot holding `cached` can skip (see the module doc): 0 or s <= len(prompt) - 1."""
        m = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            m += 1
        start = min(m, len(prompt) - 1)
        return start if start >= len(cached) - 1 or len(cached) <= self.config.sliding_window else 0

    def _begin(self, slot: int, request: _Request) -> None:
        info = self._slots[slot]
        start = self._reusable(info.cached, request.prompt)
        self._state = self._call("begin", self._state, np.int32(slot), np.int32(start), self._settings_row(request))
        info.request, info.phase, info.next, info.cached = request, "prefill", start, info.cached[:start]
        info.used = info.admitted = next(self._clock)
        request.handle.cached_tokens = start
        self._counters["cached_tokens"] += start
        self._counters["prompt_tokens"] += len(request.prompt)

    def _prefill_chunk(self) -> None:
        """Runs one prefill chunk of each of the (up to `prefill_rows`) earliest admitted requests
        still prefilling, and one decode step of every decoding slot, in one call; hands out the
        first tokens of the prompts it finished and the decode step's tokens."""
        waiting = sorted((i for i, s in enumerate(self._slots) if s.phase == "prefill"),
                         key=lambda i: self._slots[i].admitted)[: self.prefill_rows]
        rows = next(n for n in self._row_buckets if n >= len(waiting))
        slots = np.full(rows, self.slots, np.int32)  # padding rows: an out-of-range slot, nothing written
        tokens = np.zeros((rows, self.prefill_chunk), np.int32)
        starts, valid, last = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, bool)
        for r, slot in enumerate(waiting):
            info = self._slots[slot]
            prompt = info.request.prompt
            piece = prompt[info.next: info.next + self.prefill_chunk]
            slots[r], tokens[r, : len(piece)] = slot, piece
            starts[r], valid[r], last[r] = info.next, len(piece), info.next + len(piece) == len(prompt)
        decoding = any(slot.phase == "decode" for slot in self._slots)
        self._state, first, made = self._call("step", self._params, self._state, slots, tokens, starts, valid, last)
        self._counters["dispatches"] += decoding
        firsts = {}
        for r, slot in enumerate(waiting):
            info = self._slots[slot]
            info.next += int(valid[r])
            info.cached = info.request.prompt[: info.next]
            self._counters["prefilled_tokens"] += int(valid[r])
            self._counters["prefill_chunks"] += 1
            if last[r]:
                info.phase = "decode"
                firsts[r] = slot
        if firsts:
            first = _host(first)
            firsts = {slot: int(first[r]) for r, slot in firsts.items()}
        self._deliver(firsts, made if decoding else None)

    def _deliver(self, firsts: dict[int, int], out: jax.Array | None) -> int:
        """Hands the requests their first tokens (`firsts`) and a dispatch's tokens (`out` [S, steps]
        or one step's [S]); finishes and frees those the device stopped. Returns the decode steps
        `out` holds."""
        tokens = _host(out).reshape(self.slots, -1) if out is not None else None
        active = _host(self._state["active"])
        for slot, info in enumerate(self._slots):
            if info.phase != "decode" or (tokens is None and slot not in firsts):
                continue
            new = [firsts[slot]] if slot in firsts else []
            if tokens is not None:
                new += [int(t) for t in tokens[slot] if t >= 0]
            request = info.request
            info.cached = request.prompt + (request.handle.generated + new)[:-1]
            self._counters["generated_tokens"] += len(new)
            if active[slot]:
                request.handle._push(new)
                continue
            done = request.handle.generated + new
            reason = "stop" if done and done[-1] in request.settings.stop_tokens else "length"
            request.handle._push(new)
            self._free(slot, reason)
        return 0 if tokens is None else int(np.sum(np.any(tokens >= 0, axis=0)))

    def _free(self, slot: int, reason: str) -> None:
        info = self._slots[slot]
        request = info.request
        info.request, info.phase, info.used = None, "free", next(self._clock)
        with self._lock:
            self._finish(request, reason)

    def _finish(self, request: _Request, reason: str) -> None:
        """(lock held) Ends a request."""
        self._live.pop(request.handle.request_id, None)
        self._counters["cancelled" if reason == "cancelled" else "finished"] += 1
        request.handle._push([], reason)

    def run_until_idle(self) -> None:
        """Steps until no request is waiting or running."""
        while self.step():
            pass

    # ---- background loop ----------------------------------------------------------------------------

    def start(self) -> None:
        """Runs `step` in a background thread whenever there is work (until `stop`)."""
        if self._thread is not None:
            raise RuntimeError("the engine's loop is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        return
                self.step()
        except BaseException as error:  # noqa: BLE001 (the server reports it: /health)
            self.error = error
            self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            requests = list(self._live.values())
            self._queue.clear()
            self._inbox.clear()
            for request in requests:
                request.handle.error = error
                self._finish(request, "error")
        for slot in self._slots:
            slot.request, slot.phase = None, "free"

    def stop(self) -> None:
        """Stops the background loop (the requests in flight stay where they are)."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- figures ------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters: slots in use, queue length, cache bytes, token counts, requests finished or
        cancelled, compilations (total, and since warmup)."""
        with self._lock:
            compiled = self.compilations()
            return {"slots": self.slots, "slots_in_use": sum(s.phase != "free" for s in self._slots),
                    "queue_length": len(self._queue) + len(self._inbox), "cache_bytes": self._cache_bytes,
                    **self._counters, "compilations": compiled,
                    "compilations_after_warmup": None if self._warm_compilations is None
                    else compiled - self._warm_compilations, "ready": self.ready, "time": time.time()}
