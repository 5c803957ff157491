"""One request on the engine: submit, parse tokens as they arrive, cancel when the client goes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

import tiktoken
from starlette.requests import Request

from gptoss_jax.serve.errors import APIError, bad_request, overloaded, unavailable
from gptoss_jax.serve.metrics import Timing
from gptoss_jax.serve.streaming import Event, HarmonyStream, finish_reason

#: RequestSettings fields and the request parameters they come from (for a Refused naming a field).
_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "forced_tokens", "stop_tokens")


class EngineLike(Protocol):
    """What the server uses of ``gptoss_jax.engine.Engine``."""

    ready: bool
    error: BaseException | None

    def submit(self, prompt_tokens: list[int], settings: Any, request_id: str | None = None) -> Any: ...
    def cancel(self, request_id: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...


def check_available(engine: EngineLike) -> None:
    """503 (with Retry-After) while the engine compiles, or once it has failed."""
    if engine.error is not None:
        raise unavailable(f"the engine has failed: {type(engine.error).__name__}: {engine.error}", 30)
    if not engine.ready:
        raise unavailable("the engine is still compiling; retry shortly")


def refused(err: Any, max_param: str) -> APIError:
    """The engine's refusal (`Refused`: reason, field) as an API error: 429 when it is busy, 503
    when it has stopped, else a 400 naming the request parameter at fault."""
    text = str(err)
    if err.reason == "busy":
        return overloaded(f"the server is busy: {text}")
    if err.reason == "stopped":
        return unavailable(text, 30)
    param = max_param if err.field == "max_tokens" else err.field if err.field in _PARAMS else None
    return bad_request(text, param)


@dataclass
class Job:
    """An engine request whose tokens are parsed into harmony parts as they arrive."""

    engine: EngineLike
    encoding: tiktoken.Encoding
    prompt: list[int]
    settings: dict[str, Any]
    timing: Timing
    stop_strings: tuple[str, ...] = ()
    max_param: str = "max_tokens"
    request_id: str = field(default_factory=lambda: f"req_{secrets.token_hex(8)}")
    handle: Any = None
    stream: HarmonyStream = field(init=False)

    def __post_init__(self) -> None:
        self.stream = HarmonyStream(self.encoding, self.stop_strings)

    def submit(self) -> None:
        """Hands the request to the engine; its refusals become 400 / 429."""
        from gptoss_jax.engine import Refused, RequestSettings

        check_available(self.engine)
        try:
            self.handle = self.engine.submit(self.prompt, RequestSettings(**self.settings), request_id=self.request_id)
        except Refused as err:  # counted by the error handler, as every refused request is
            self.timing.reported = True
            raise refused(err, self.max_param) from err

    async def events(self) -> AsyncIterator[list[Event]]:
        """Parser events per batch of tokens; the engine request is cancelled if this ends early."""
        complete = False
        try:
            async with contextlib.aclosing(self.handle.astream()) as chunks:
                async for tokens in chunks:
                    self.timing.tokens_arrived(len(tokens))
                    events = self.stream.feed(tokens)
                    if events:
                        yield events
                    if self.stream.finished:
                        break
            complete = True
            events = self.stream.close()
            if events:
                yield events
        finally:
            if not complete or self.stream.stopped:
                self.engine.cancel(self.request_id)
            if not complete:
                self.timing.finish("cancelled", self.prompt_tokens, self.cached_tokens)

    def cancel_unless_finished(self) -> None:
        """Cancels the engine request if it is still running (a stream whose client left before it began)."""
        if self.handle is not None and self.handle.finish_reason is None:
            self.engine.cancel(self.request_id)

    async def run(self) -> None:
        """Reads the whole completion."""
        async for _ in self.events():
            pass

    @property
    def prompt_tokens(self) -> int:
        return int(getattr(self.handle, "prompt_tokens", len(self.prompt)) or len(self.prompt))

    @property
    def cached_tokens(self) -> int:
        return int(getattr(self.handle, "cached_tokens", 0) or 0)

    def finish_reason(self) -> str:
        """stop | length | tool_calls; an engine failure raises a 500 (a stream sends it as an error event)."""
        engine_reason = None if self.stream.stopped else self.handle.finish_reason
        if engine_reason == "error":
            self.timing.finish("error", self.prompt_tokens, self.cached_tokens)
            raise APIError(500, "the engine failed while generating this request", type="server_error",
                           code="engine_error")
        reason = finish_reason(self.stream, engine_reason)
        outcome = "cancelled" if engine_reason == "cancelled" else reason
        self.timing.finish(outcome, self.prompt_tokens, self.cached_tokens)
        return reason


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, job: Job) -> AsyncIterator[None]:
    """While inside, a client that disconnects cancels the job's engine request."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.engine.cancel(job.request_id)
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
