"""What a client hands the engine (`RequestSettings`, a prompt) and gets back (`Handle`, `Refused`)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from collections.abc import AsyncIterator, Iterator

from gptoss_jax.tokenizer import STOP_TOKENS


class Refused(ValueError):
    """A request the engine will not take, raised before any work: the message says why, `reason`
    what kind of refusal it is ("invalid": the request itself, "busy": the queue is full, retry
    later; "stopped": the engine failed), and `field` which request field is at fault (or None)."""

    def __init__(self, message: str, *, reason: str = "invalid", field: str | None = None):
        super().__init__(message)
        self.reason, self.field = reason, field


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """One request's token budget, sampling, stop tokens and constraints (validated when made).

    `max_tokens` counts every generated token, forced ones included; temperature 0 is greedy; top_k 0,
    top_p 1 and min_p 0 are off; the same seed, prompt and settings give the same tokens whatever
    else the engine runs (None: the engine picks one); `forced_tokens` are emitted first as if
    sampled; with `allowed_tokens` every sampled token is one of them."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = STOP_TOKENS
    forced_tokens: tuple[int, ...] = ()
    allowed_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not _integer(self.max_tokens) or self.max_tokens < 1:
            raise Refused(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", field="max_tokens")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise Refused(f"temperature must be a finite number >= 0, got {self.temperature!r}", field="temperature")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise Refused(f"top_p must be in (0, 1], got {self.top_p!r}", field="top_p")
        if not _integer(self.top_k) or self.top_k < 0:
            raise Refused(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}", field="top_k")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            raise Refused(f"min_p must be in [0, 1), got {self.min_p!r}", field="min_p")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 2 ** 64):
            raise Refused(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}", field="seed")
        for name in ("stop_tokens", "forced_tokens") + (("allowed_tokens",) if self.allowed_tokens is not None else ()):
            tokens = getattr(self, name)
            if not isinstance(tokens, (tuple, list)) or not all(_integer(t) and t >= 0 for t in tokens):
                raise Refused(f"{name} must be a tuple of token ids >= 0, got {tokens!r}", field=name)
            object.__setattr__(self, name, tuple(tokens))
        if self.allowed_tokens is not None and not self.allowed_tokens:
            raise Refused("allowed_tokens must not be empty (None: every token allowed)", field="allowed_tokens")


class Handle:
    """One submitted request: its tokens as they are made, and how it finished."""

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._chunks: list[list[int]] = []
        self._done = threading.Condition()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _push(self, tokens: list[int], finish_reason: str | None = None) -> None:
        """Engine side: new tokens, and the finish reason when the request has ended."""
        with self._done:
            if tokens:
                self.generated.extend(tokens)
                self._chunks.append(list(tokens))
            if finish_reason is not None:
                self.finish_reason = finish_reason
            self._done.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop has closed
                pass

    def stream(self) -> Iterator[list[int]]:
        """New tokens as each dispatch makes them (blocking); ends when the request has finished."""
        seen = 0
        while True:
            with self._done:
                while seen == len(self._chunks) and self.finish_reason is None:
                    self._done.wait()
                chunks, finished = self._chunks[seen:], self.finish_reason is not None
            seen += len(chunks)
            yield from chunks
            if finished and seen == len(self._chunks):
                return

    async def astream(self) -> AsyncIterator[list[int]]:
        """`stream` for asyncio code: waits without blocking the event loop."""
        event, seen = asyncio.Event(), 0
        waiter = (asyncio.get_running_loop(), event)
        with self._done:
            self._waiters.add(waiter)
        try:
            while True:
                with self._done:
                    chunks, finished = self._chunks[seen:], self.finish_reason is not None
                    event.clear()
                seen += len(chunks)
                for chunk in chunks:
                    yield chunk
                if finished:
                    with self._done:
                        if seen == len(self._chunks):
                            return
                    continue
                if not chunks:
                    await event.wait()
        finally:
            with self._done:
                self._waiters.discard(waiter)

    def result(self, timeout: float | None = None) -> list[int]:
        """Every generated token once the request has finished (TimeoutError after `timeout` s)."""
        with self._done:
            if not self._done.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request {self.request_id} has not finished after {timeout} s")
            return list(self.generated)

    def __repr__(self) -> str:
        return (f"Handle({self.request_id!r}, prompt_tokens={self.prompt_tokens}, generated={len(self.generated)}, "
                f"finish_reason={self.finish_reason!r})")
